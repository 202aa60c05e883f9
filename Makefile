# The README's quick start is two commands on a fresh machine:
#   make demo   create .venv, install medsilo, run the main job
#   make test   create .venv, install medsilo with test extras, run the test suite
# Everything installs through constraints.txt, which pins torch to the 2.13.0 CPU wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medsilo-installed
DEMO ?= demo

.PHONY: setup demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/medsilo demo --out $(DEMO)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache benchmarks/work
