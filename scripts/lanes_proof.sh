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
for n in 2 4; do
  (( n > NGPU )) || [[ ${EP_SCALING:-1} == 0 ]] && continue
  timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" scripts/moe_ep_scaling.py \
    --json "$OUT/moe_ep_scaling_${n}gpu.json" > "$OUT/moe_ep_scaling_${n}gpu.txt" 2>&1
  tail -12 "$OUT/moe_ep_scaling_${n}gpu.txt"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| run | lane | tokens/s (measured) | tokens/s (plan estimate) | goodput | step p50 s | final loss |",
        "|---|---|---:|---:|---:|---:|---:|"]
for rec in sorted(out.glob("receipt-*.json")):
    name = rec.stem.removeprefix("receipt-")
    r = json.loads(rec.read_text())
    lane = r.get("lane", {})
    lane_s = " ".join(f"{k}{lane[k]}" for k in ("tp", "pp", "ep", "dp") if k in lane) + (" sp" if lane.get("sp") else "")
    est = "-"
    plan = out / f"plan-{name}.json"
    try:
        est = f"{json.loads(plan.read_text())['tokens_per_s']:,.0f}"
    except Exception:  # the plan's JSON layout is the planner's; show what is there
        pass
    t = r.get("throughput", {})
    g = r.get("goodput", {})
    rows.append(f"| {name} | {lane_s} | {t.get('tokens_per_s', 0):,.0f} | {est} | "
                f"{g.get('goodput_fraction', '-')} | "
                f"{t.get('step_time_s', {}).get('p50', '-')} | {r.get('loss', {}).get('final', '-')} |")
(out / "lanes.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
