# The README's quick start is two commands on a fresh machine:
#   make demo   create .venv, install medsilo, run the main job
#   make test   create .venv, install medsilo with test extras (and the Orthanc PACS, below), run the test suite
# Everything installs through constraints.txt, which pins torch to the 2.13.0 CPU wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medsilo-installed
DEMO ?= demo
ORTHANC_STAMP := $(VENV)/.orthanc-installed
ORTHANC_PACKAGES := orthanc orthanc-dicomweb
ORTHANC_HELP := make test: tests/sim/test_pacs.py needs the Debian packages $(ORTHANC_PACKAGES) (a real PACS); \
	install them as root: apt-get update && apt-get install -y $(ORTHANC_PACKAGES)

.PHONY: setup demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(STAMP)

# The PACS tests start a real Orthanc with its DICOMweb plugin: installed here when missing, as root or with sudo.
$(ORTHANC_STAMP): | $(STAMP)
	@if ! dpkg -s $(ORTHANC_PACKAGES) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "$(ORTHANC_HELP)" >&2; exit 1; fi; \
	  { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $(ORTHANC_PACKAGES); } \
	    || { echo "$(ORTHANC_HELP)" >&2; exit 1; }; \
	fi
	touch $@

demo: setup
	$(BIN)/medsilo demo --out $(DEMO)

test: setup $(ORTHANC_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache benchmarks/work
