# Two commands: `make demo` (set up, then run the whole pipeline offline on the tiny kit)
# and `make test` (set up, then run the test suite). Both need only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-slow test-parity bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	PYTHON=$(PY) bash scripts/offline_demo.sh

test: setup
	$(PY) -m pytest -m "not slow and not parity" -q -n 2

test-slow: setup
	$(PY) -m pytest -m "slow" -q

# The official scorer packages (docs/environment.md, set B) in their own environment, and the
# parity tests comparing rpo's scorers with them on the tiny weights (tests/test_scores_parity.py).
PARITY_VENV ?= .venv-parity

$(PARITY_VENV)/.installed: requirements-parity.txt
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/pip install --upgrade --quiet pip
	$(PARITY_VENV)/bin/pip install --quiet -r requirements-parity.txt
	touch $@

test-parity: setup $(PARITY_VENV)/.installed
	RPO_PARITY_PYTHON=$(abspath $(PARITY_VENV))/bin/python RPO_REQUIRE_PARITY=1 $(PY) -m pytest -m parity -q
