# Every target sets itself up from a fresh clone: a virtualenv at .venv with the
# project installed in editable mode. torch is pinned to the CPU build that installs
# from local disk on our development and CI machines; a CUDA host installs its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# Progress bars on, pip's notices about its own version off (noise on every install).
PIP := $(PY) -m pip --disable-pip-version-check
PIP_INSTALL := $(PIP) install --progress-bar on

.PHONY: all setup demo test test-all bench lint dist clean

all: test

$(PY):
	@echo "== creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "== upgrading pip"
	$(PIP_INSTALL) --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "== installing torch $(TORCH_VERSION) first (the largest download: a minute or two)"
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
	@echo "== installing aitbc-miner (editable) with its transformers, coordinator, test and lint extras"
	$(PIP_INSTALL) -e ".[transformers,coordinator,test,lint]"
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

# dist/: an sdist, then the wheel built from it (so the sdist is complete), offline: setuptools'
# own PEP 517 hooks from the virtualenv, no isolated build environment to download.
dist: $(STAMP)
	rm -rf dist
	@echo "== building the sdist"
	$(PY) -c 'from setuptools import build_meta as b; print(b.build_sdist("dist"))'
	@echo "== building the wheel from the sdist"
	rm -rf build/sdist && mkdir -p build/sdist && tar -xzf dist/*.tar.gz -C build/sdist
	cd build/sdist/* && ../../../$(PY) -c 'from setuptools import build_meta as b; print(b.build_wheel("../../../dist"))'
	@ls -l dist

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .demo
