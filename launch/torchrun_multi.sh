#!/usr/bin/env bash
# Several nodes: run this once per node with the same MASTER_ADDR/MASTER_PORT and NNODES and this
# node's NODE_RANK (static rendezvous), or with --rdzv-endpoint host:port (c10d rendezvous, elastic).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/torchrun_multi.sh [--nnodes N] [--node-rank R] [--master-addr A] [--master-port P]
                                [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--gpus N]
                                [--hardware h100|h200|b200] [--dry-run] [--] [train args...]

Defaults come from the environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (29500), GPUS_PER_NODE.
With --rdzv-endpoint (or RDZV_ENDPOINT) torchrun uses c10d rendezvous and NODE_RANK is not needed.
example (node 0 of 2): NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multi.sh -- --lanes auto
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nnodes="${NNODES:-}" node_rank="${NODE_RANK:-}" master_addr="${MASTER_ADDR:-}" master_port="${MASTER_PORT:-29500}"
rdzv="${RDZV_ENDPOINT:-}" rdzv_id="${RDZV_ID:-megatron-ext}" gpus="${GPUS_PER_NODE:-8}" hardware="h100" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    --rdzv-endpoint) rdzv="$2"; shift 2 ;;
    --rdzv-id) rdzv_id="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --hardware) hardware="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
fail() { echo "torchrun_multi.sh: $1" >&2; usage >&2; exit 2; }
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || fail "nnodes=${nnodes:-unset}: set --nnodes or NNODES to a positive integer"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || fail "gpus=$gpus: not a positive integer"
if [[ -n "$rdzv" ]]; then
  launch=(--rdzv-backend c10d --rdzv-endpoint "$rdzv" --rdzv-id "$rdzv_id")
else
  [[ -n "$master_addr" ]] || fail "master_addr unset: set --master-addr/MASTER_ADDR or use --rdzv-endpoint"
  [[ "$node_rank" =~ ^[0-9]+$ ]] || fail "node_rank=${node_rank:-unset}: set --node-rank or NODE_RANK (0..nnodes-1)"
  (( node_rank < nnodes )) || fail "node_rank=$node_rank: must be below nnodes=$nnodes"
  launch=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
fi

source "$here/nccl_env.sh" "$hardware"
set -euo pipefail
python="${PYTHON:-python}"
cmd=("$python" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$gpus" "${launch[@]}"
     -m megatron_ext train "$@")
if [[ $dry_run -eq 1 ]]; then
  env | grep -E '^(NCCL_|CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_)' | sort
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
