# `make run`: set up .venv and train the default preset. `make test`: set up .venv and run the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.megatron-ext-installed

export TORCH_COMPILE_DISABLE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: setup run test bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) runs *.egg-info
