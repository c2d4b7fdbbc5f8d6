# Set-up is part of every target: a missing .venv is created and filled.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,demo

.PHONY: venv test demo bench vectors lint typecheck clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: anything else would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m fedcollm_secure.cli demo

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),flower]"
	$(PY) benchmarks/secagg/run.py

vectors: $(STAMP)
	$(PY) protocols/masking/v1/generate_vectors.py

lint: $(STAMP)
	$(PY) -m ruff check fedcollm_secure tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info
