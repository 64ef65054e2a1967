# The README's two commands. Each sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests: 8 virtual CPU devices so every sharding path runs without accelerators; CPU collectives get
# 10 minutes (not 40 s) before aborting, since 8 devices on 2 busy cores can be slow to meet.
COLLECTIVE_TIMEOUTS := --xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 $(COLLECTIVE_TIMEOUTS)" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
# The demo: one CPU device, several times faster than 8 virtual ones on a 2-core machine.
DEMO_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=1" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2

.PHONY: demo demo-dit demo-2d test test-slow lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,interop,tpu]'
	touch $(STAMP)

install: $(STAMP)

# The main job: iCT on the embedded digits dataset (no downloads).
demo: $(STAMP)
	$(DEMO_ENV) $(PY) -m cmjax.main --config=configs/digits.py --workdir=$${WORKDIR:-workdirs/digits}

# The same job with a small DiT (configs/digits.py:dit) in place of the MLP.
demo-dit: $(STAMP)
	$(DEMO_ENV) $(PY) -m cmjax.main --config=configs/digits.py:dit --workdir=$${WORKDIR:-workdirs/digits_dit}

# Consistency distillation of an exact 2-D Gaussian-mixture teacher (about a minute).
demo-2d: $(STAMP)
	$(DEMO_ENV) $(PY) -m cmjax.demo_2d --workdir=$${WORKDIR:-workdirs/demo_2d}

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -q

# The second tier (CI runs both): checks marked slow or multiprocess (CLI subprocesses, 2-process training and
# evaluation, the 2-step search, the PyTorch equivalence): minutes each on 2 cores.
test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -q -m "slow or multiprocess"

# ruff: pyflakes, pycodestyle and import order (pyproject.toml); the import layering is tests/test_layering.py.
lint: $(STAMP)
	$(PY) -m ruff check cmjax configs tests bench

clean:
	rm -rf $(VENV) workdirs .jax_cache
