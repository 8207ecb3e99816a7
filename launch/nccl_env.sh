#!/usr/bin/env bash
# NCCL environment per hardware profile; source it: `source launch/nccl_env.sh h100|h200|b200`.
# Every variable keeps a value the caller already exported (${VAR:-default}).
set -euo pipefail

megatron_ext_nccl_env() {
  local profile="${1:-h100}"
  case "$profile" in
    h100|h100-80g|h200|h200-141g|b200|b200-192g) ;;
    *) echo "nccl_env.sh: profile=$profile: unknown; use h100, h200 or b200" >&2; return 2 ;;
  esac
  # NVLink SHARP / multicast (NVLS) offloads all-reduce into the NVSwitch. It is off by default:
  # it needs the fabric manager, multicast-capable drivers and IMEX on every node, and where one of
  # them is missing or mismatched NCCL's communicator set-up or first collective can hang instead of
  # failing (seen in containers without CUDA multicast support and on partitioned/MIG systems).
  # Turn it on (1) only on systems where nccl-tests pass with it.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  # Megatron's TP/SP collectives and the gradient buffers overlap with compute only if at most one
  # kernel is queued per stream ahead; Megatron asserts this for sequence parallel on Hopper/Blackwell.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # Fail fast with a traceback instead of hanging forever when a rank dies mid-collective.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # One line per communicator at start-up (transport, rings, NVLS on/off): enough to see which
  # network NCCL picked without flooding the log; use INFO + NCCL_DEBUG_SUBSYS=ALL to debug.
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # GPUDirect RDMA between the NIC and GPU memory when they share a PCIe switch (DGX/HGX layout).
  export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
  # InfiniBand: one 400 Gb/s ConnectX-7 per GPU on DGX/HGX H100, H200 and B200; NCCL discovers
  # the mlx5 devices itself. Set NCCL_IB_HCA only to exclude storage NICs (e.g. "=mlx5_0,mlx5_3").
  # Keep socket bootstrap off docker/loopback interfaces.
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
  case "$profile" in
    b200|b200-192g)
      # NVLink 5 (1.8 TB/s per GPU): NCCL >= 2.23 picks its own channel count; more channels than
      # the default only help on the larger NVLink domain of GB200 NVL72, not on 8-GPU HGX.
      export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
      ;;
    h100|h100-80g|h200|h200-141g)
      # Hopper: NVLink 4 (900 GB/s per GPU). Nothing profile-specific beyond the common settings.
      ;;
  esac
}

# When sourced, apply; when run, print the environment it would set.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  set +euo pipefail  # do not leave strict mode on in the caller's shell
  megatron_ext_nccl_env "${1:-h100}"
else
  megatron_ext_nccl_env "${1:-h100}"
  env | grep -E '^(NCCL_|CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_)' | sort
fi
