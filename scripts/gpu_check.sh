#!/usr/bin/env bash
# One GPU session: environment, the whole test suite (GPU tests included), a `megatron-ext train`
# run of the `small` preset, and the benchmark table. Results go under ${OUT:-gpu-out}.
# Extra wheels (e.g. megatron-core for this Python) may be put in ./.whl beforehand.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_COMPILE_DISABLE=1
STEPS=${STEPS:-tests,train,bench}

python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, torch, triton
from megatron.core import package_info
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| megatron-core", package_info.__version__)
print("device", torch.cuda.get_device_name(), "| count", torch.cuda.device_count())
PY

if [[ $STEPS == *tests* ]]; then
  # GPU tests in one process; the CPU-lane suite in another with CUDA hidden, as on a CPU machine.
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -20 | tee "$OUT/pytest-gpu.txt"
  CUDA_VISIBLE_DEVICES= timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not gpu" tests ${PYTEST_ARGS:-} \
    2>&1 | tail -30 | tee "$OUT/pytest-cpu-lane.txt"
fi
if [[ $STEPS == *train* ]]; then
  # TRAIN_RUNS: "name:args;name:args" (default: the tiny and small presets)
  rm -rf /tmp/runs
  IFS=';' read -ra runs <<< "${TRAIN_RUNS:-tiny:--preset tiny;small:--preset small}"
  for run in "${runs[@]}"; do
    name=${run%%:*}
    timeout 420 python3 -m megatron_ext train ${run#*:} --runs-root /tmp/runs --run-dir "/tmp/runs/$name" \
      --progress log 2>&1 | grep -v Warning | tee "$OUT/train-$name.log" | tail -12
    cp "/tmp/runs/$name/receipt.json" "$OUT/receipt-$name.json" 2>/dev/null
    cp "/tmp/runs/$name/loss.png" "$OUT/loss-$name.png" 2>/dev/null
  done
fi
if [[ $STEPS == *bench* ]]; then
  timeout 300 python3 -m bench ${BENCH_ARGS:-} --markdown "$OUT/bench.md" --json "$OUT/bench.json" 2>&1 | tail -30
fi
