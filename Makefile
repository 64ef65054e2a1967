# The README's two commands. Each sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# 8 virtual CPU devices so every sharding path runs without accelerators.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2

.PHONY: demo demo-2d test test-slow install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,interop]'
	touch $(STAMP)

install: $(STAMP)

# The main job: iCT on the embedded digits dataset (no downloads), on 8 virtual CPU devices.
demo: $(STAMP)
	$(TEST_ENV) $(PY) -m cmjax.main --config=configs/digits.py --workdir=$${WORKDIR:-workdirs/digits}

# Consistency distillation of an exact 2-D Gaussian-mixture teacher (about a minute).
demo-2d: $(STAMP)
	$(TEST_ENV) $(PY) -m cmjax.demo_2d --workdir=$${WORKDIR:-workdirs/demo_2d}

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -q

test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) workdirs
