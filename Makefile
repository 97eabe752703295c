# Every target sets itself up from a fresh clone: a virtualenv at .venv with the
# project installed in editable mode. torch is pinned to the CPU build that installs
# from local disk on our development and CI machines; a CUDA host installs its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: all setup demo test test-all bench lint clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[transformers,coordinator,test,lint]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m miner demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q --run-slow

bench: $(STAMP)
	$(PY) bench/run.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .demo
