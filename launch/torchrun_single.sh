#!/usr/bin/env bash
# One node: torchrun with one process per GPU running `megatron-ext train`.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/torchrun_single.sh [--gpus N] [--hardware h100|h200|b200] [--dry-run] [--] [train args...]

Starts `megatron-ext train <train args>` under torchrun on this node, one process per GPU,
with the NCCL environment of launch/nccl_env.sh for the hardware profile.
  --gpus N        processes (default: the GPUs nvidia-smi lists, else 1)
  --hardware P    NCCL profile (default h100)
  --dry-run       print the environment and the torchrun command instead of running it
example: launch/torchrun_single.sh --gpus 8 -- --preset small --lanes auto
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gpus="" hardware="h100" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --hardware) hardware="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ -z "$gpus" ]]; then
  gpus="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || gpus=1
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun_single.sh: --gpus=$gpus: not a positive integer" >&2; exit 2; }

source "$here/nccl_env.sh" "$hardware"
set -euo pipefail
python="${PYTHON:-python}"
cmd=("$python" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$gpus"
     -m megatron_ext train "$@")
if [[ $dry_run -eq 1 ]]; then
  env | grep -E '^(NCCL_|CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_)' | sort
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
