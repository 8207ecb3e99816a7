# `make run`: set up .venv and train the default preset. `make test`: set up .venv and run the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.megatron-ext-installed

export TORCH_COMPILE_DISABLE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: setup run test test-mcore-next bench clean

setup: $(STAMP)

# Reuse a torch that is already installed (e.g. an NGC container) by seeing the system packages;
# otherwise install torch==2.13.0, which on a CPU-only machine is the local CPU wheel.
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "reusing the installed torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(VENV)/bin/megatron-ext train

# The tests run twice: against the installed megatron-core (0.16.1, the newest for Python 3.11), then
# against MCORE_NEXT unpacked as an overlay (scripts/mcore_overlay.py), the release GPU runs use.
# The second pass leaves out the tests of kernels and tools that never import megatron-core.
MCORE_NEXT ?= 0.19.2
MCORE_INDEPENDENT := tests/test_ops_mhc.py tests/test_ops_moe.py tests/test_ops_moe_triton.py \
	tests/test_ops_sparse_attention.py tests/test_ops_sparse_topk.py tests/test_ops_triton_decode.py \
	tests/test_moe_router_triton.py tests/test_moe_te.py tests/test_sparse_decode.py \
	tests/test_backends.py tests/test_bench_harness.py tests/test_plan.py tests/test_train_gpu.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-mcore-next

test-mcore-next: $(STAMP)
	$(PY) scripts/mcore_overlay.py --version $(MCORE_NEXT) -- -q -p no:cacheprovider \
	  $(addprefix --ignore=,$(MCORE_INDEPENDENT))

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) runs *.egg-info .mcore
