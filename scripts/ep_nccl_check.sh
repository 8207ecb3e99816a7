#!/usr/bin/env bash
# Expert parallelism over NCCL on 2 GPUs, smallest first: the bare fused MoE layer (Triton, then
# grouped_mm), then `megatron-ext train --lanes ep2`. Every step prints a line per rank and a step
# over HANG s dumps each rank's Python stacks, so a stall shows where it waits. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-ep-check}
HANG=${HANG:-45}
mkdir -p "$OUT"
run() {  # name timeout cmd...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout -s INT "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? $((SECONDS - t0)) s | $(grep -v Warning "$OUT/$name.log" | tail -1)"
}
EP="python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/moe_ep_scaling.py --verbose --hang-dump-seconds $HANG --ep-sizes 2"
run layer_triton_small 120 $EP --backend triton --tokens-per-gpu 2048 --hidden 512 --ffn 256 --num-experts 8 --topk 2 --iters 5 --warmup 2
run layer_grouped_mm_small 90 $EP --backend grouped_mm --tokens-per-gpu 2048 --hidden 512 --ffn 256 --num-experts 8 --topk 2 --iters 5 --warmup 2
run layer_torch_small 90 $EP --backend torch --tokens-per-gpu 2048 --hidden 512 --ffn 256 --num-experts 8 --topk 2 --iters 5 --warmup 2
run train_ep2 ${TRAIN_T:-150} python3 -m megatron_ext train --preset small --train-iters ${ITERS:-40} --eval-iters 0 \
  --save-interval 1000 --num-experts 8 --moe-router-topk 2 --lanes ep2 --log-interval 1 --progress log \
  --hang-dump-seconds $HANG --nproc-per-node 2 --runs-root /tmp/epc --run-dir /tmp/epc/ep2
cp /tmp/epc/ep2/receipt.json "$OUT/receipt-ep2.json" 2>/dev/null || true
