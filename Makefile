# The two set-up commands of the README: `make train` (main job) and `make test` (whole suite).
# Both create .venv when it is missing. torch is installed first from `torch==2.13.0`, the CPU
# wheel on this kind of machine, so that no other requirement pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.limoe_ds-installed

.PHONY: venv train test clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) launch/smoke_tiny.py

test: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) runs
