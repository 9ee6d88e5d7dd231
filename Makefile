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
	$(PY) -m pytest -m "not slow and not parity" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q
