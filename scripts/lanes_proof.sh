#!/usr/bin/env bash
# Lane proof runs on one multi-GPU node: each lane trains the `small` preset (dense, MoE, and the
# sparse-MQA + MoE + mHC "trifecta") for a few dozen steps, next to the planner's estimate for the
# same flags; then the EP weak-scaling script. Writes receipts, logs and a Markdown table to $OUT.
#
#   OUT=out bash scripts/lanes_proof.sh            # uses every visible GPU (2 or more)
#   ITERS=60 RUNS="tp2 pp2 ep2" bash scripts/lanes_proof.sh
#   EXTRA="--hang-dump-seconds 60" ...      # extra train flags for every run
#   EP_SCALING=0 ...                                 # skip the EP weak-scaling script
#   TRAIN_TIMEOUT=150 ...                            # seconds per train run (default 420)
#   RUNS="megatron_tp2 reshard" ...                  # Megatron's pretrain with our --spec at TP=2+SP;
#                                                    # a tp2,sp run resumed half-way on one GPU
set -uo pipefail
OUT=${OUT:-lanes-out}
ITERS=${ITERS:-60}
mkdir -p "$OUT"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
HW=$(python3 -c "import torch; from launch.hardware import detect; p = detect(torch.cuda.get_device_name()); print(p.name if p else 'h100-80g')" 2>/dev/null || echo h100-80g)
MOE="--num-experts 8 --moe-router-topk 2"
TRI="--attention-pattern WWWD --window-size 256 --num-sink-tokens 4 $MOE --mhc-num-streams 4"
declare -A ARGS=(
  [tp2]="2|--lanes tp2,sp"
  [pp2]="2|--lanes pp2"
  [fsdp2]="2|--lanes fsdp2"
  [ep2]="2|$MOE --lanes ep2"
  [ep4]="4|$MOE --lanes ep4"
  [tri_ep2]="2|$TRI --lanes ep2"
  [tri_ep4]="4|$TRI --lanes ep4"
)
RUNS=${RUNS:-"tp2 pp2 fsdp2 ep2 ep4 tri_ep4"}
for name in $RUNS; do
  [[ -v "ARGS[$name]" ]] || continue  # megatron_tp2 and reshard run below
  n=${ARGS[$name]%%|*}
  args="--preset small --train-iters $ITERS --eval-iters 0 --save-interval 1000 ${ARGS[$name]#*|} ${EXTRA:-}"
  if (( n > NGPU )); then echo "skip $name: needs $n GPUs, $NGPU visible"; continue; fi
  python3 -m megatron_ext plan $args --nodes 1 --gpus-per-node "$n" --hardware "$HW" --json \
    > "$OUT/plan-$name.json" 2> "$OUT/plan-$name.err"
  timeout ${TRAIN_TIMEOUT:-420} python3 -m megatron_ext train $args --nproc-per-node "$n" --runs-root /tmp/lanes \
    --run-dir "/tmp/lanes/$name" --progress log > "$OUT/train-$name.log" 2>&1
  echo "$name: rc=$? $(tail -1 "$OUT/train-$name.log")"
  cp "/tmp/lanes/$name/receipt.json" "$OUT/receipt-$name.json" 2>/dev/null
done
SMALL="--num-layers 8 --hidden-size 512 --num-attention-heads 8 --seq-length 1024 --max-position-embeddings 1024"
if [[ " $RUNS " == *" megatron_tp2 "* ]] && (( NGPU >= 2 )); then
  # Megatron's own GPT pretrain, this project's mHC block spec (n=4) with the fused MoE, TP=2+SP
  printf 'mhc: {num_streams: 4}\nmoe: {impl: fused}\n' > "$OUT/knobs.yaml"
  MEGATRON_EXT_CONFIG="$OUT/knobs.yaml" CUDA_DEVICE_MAX_CONNECTIONS=1 timeout "${TRAIN_TIMEOUT:-420}" \
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m launch.pretrain_gpt \
    --spec layer_specs.mhc mhc_block_spec --tensor-model-parallel-size 2 --sequence-parallel \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 $SMALL --num-experts 8 --moe-router-topk 2 \
    --moe-token-dispatcher-type alltoall --micro-batch-size 16 --global-batch-size 64 --train-iters "$ITERS" \
    --lr 1.5e-3 --bf16 --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
    --attention-dropout 0 --hidden-dropout 0 --eval-iters 0 --log-interval 5 --log-throughput \
    > "$OUT/train-megatron_tp2.log" 2>&1
  echo "megatron_tp2: rc=$? $(grep -o 'elapsed time per iteration (ms): [0-9.]*' "$OUT/train-megatron_tp2.log" | tail -1)"
fi
if [[ " $RUNS " == *" reshard "* ]] && (( NGPU >= 2 )); then
  # a tp2,sp run saving half-way; its half-way checkpoint resumed on ONE GPU (Megatron's distributed
  # checkpointing reshards it); the resumed steps' loss against the tp2 run's own
  half=$(( ITERS / 2 ))
  base="--preset small --train-iters $ITERS --eval-iters 0 --save-interval $half --lr-warmup-iters 2 --runs-root /tmp/lanes --progress log"
  timeout "${TRAIN_TIMEOUT:-420}" python3 -m megatron_ext train $base --lanes tp2,sp --nproc-per-node 2 \
    --run-dir /tmp/lanes/reshard_tp2 > "$OUT/train-reshard_tp2.log" 2>&1
  rm -rf /tmp/lanes/reshard_tp1 && cp -r /tmp/lanes/reshard_tp2 /tmp/lanes/reshard_tp1
  rm -rf "/tmp/lanes/reshard_tp1/checkpoints/iter_$(printf %07d "$ITERS")"
  echo "$half" > /tmp/lanes/reshard_tp1/checkpoints/latest_checkpointed_iteration.txt
  timeout "${TRAIN_TIMEOUT:-420}" python3 -m megatron_ext train $base --resume --make-vocab-size-divisible-by 256 \
    --nproc-per-node 1 --run-dir /tmp/lanes/reshard_tp1 > "$OUT/train-reshard_tp1.log" 2>&1
  python3 - "$half" <<'PY' | tee "$OUT/reshard.txt"
import json, sys
half = int(sys.argv[1])
def losses(run):
    rows = [json.loads(x) for x in open(f"/tmp/lanes/{run}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train" and r["step"] > half}
a, b = losses("reshard_tp2"), losses("reshard_tp1")
steps = sorted(set(a) & set(b))
rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps) if steps else float("nan")
print(f"reshard tp2,sp -> tp1 at step {half}: steps {steps[:1]}..{steps[-1:]} compared ({len(steps)}), "
      f"max rel. loss diff {rel:.2e}; tp2 {a.get(steps[-1]) if steps else '-'} vs tp1 "
      f"{b.get(steps[-1]) if steps else '-'} at the last step")
PY
fi
for n in 2 4; do
  (( n > NGPU )) || [[ ${EP_SCALING:-1} == 0 ]] && continue
  timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" scripts/moe_ep_scaling.py \
    --json "$OUT/moe_ep_scaling_${n}gpu.json" > "$OUT/moe_ep_scaling_${n}gpu.txt" 2>&1
  tail -12 "$OUT/moe_ep_scaling_${n}gpu.txt"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| run | lane | tokens/s (measured) | tokens/s (plan estimate) | goodput | step p50 s | final loss "
        "| peak GiB allocated (measured) | plan GiB w/o overhead / total |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for rec in sorted(out.glob("receipt-*.json")):
    name = rec.stem.removeprefix("receipt-")
    r = json.loads(rec.read_text())
    lane = r.get("lane", {})
    lane_s = " ".join(f"{k}{lane[k]}" for k in ("tp", "pp", "ep", "dp") if k in lane) + (" sp" if lane.get("sp") else "")
    est, mem_est = "-", "-"
    plan = out / f"plan-{name}.json"
    try:
        p = json.loads(plan.read_text())
        est = f"{p['tokens_per_s']:,.0f}"
        m = p["memory_gib"]
        mem_est = f"{m['total'] - m['overhead']:.2f} / {m['total']:.2f}"
    except Exception:  # the plan's JSON layout is the planner's; show what is there
        pass
    mem = r.get("memory_bytes", {}).get("device_max_allocated")
    mem_s = f"{mem / 2**30:.2f}" if mem else "-"
    t = r.get("throughput", {})
    g = r.get("goodput", {})
    rows.append(f"| {name} | {lane_s} | {t.get('tokens_per_s', 0):,.0f} | {est} | "
                f"{g.get('goodput_fraction', '-')} | "
                f"{t.get('step_time_s', {}).get('p50', '-')} | {r.get('loss', {}).get('final', '-')} | "
                f"{mem_s} | {mem_est} |")
(out / "lanes.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
