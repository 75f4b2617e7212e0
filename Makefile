# Common commands. `make test` is what CI runs (see .ci/run and README).
PY ?= .venv/bin/python

.PHONY: venv install test lint format bench bench-quick test-gpu-versions

venv:
	test -x $(PY) || python3 -m venv .venv

install: venv
	$(PY) -m pip install -q torch==2.13.0 -e ".[test]"

test:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench:
	.venv/bin/btfast bench

bench-quick:
	.venv/bin/btfast bench --quick

# The suite against the GPU machines' releases (torch 2.11 CUDA build, triton 3.6, transformers 5.17), on the CPU:
# a CUDA build also runs tests/test_fake_cuda_trace.py (the CUDA path traced on fake tensors). ~3 GB download.
# NumPy < 2.4: Triton 3.6's interpreter turns one-element arrays into ints, which NumPy 2.4 refuses.
GPU_VERSIONS_VENV ?= .venv-gpu-versions
test-gpu-versions:
	test -x $(GPU_VERSIONS_VENV)/bin/python || python3 -m venv $(GPU_VERSIONS_VENV)
	$(GPU_VERSIONS_VENV)/bin/pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4" -e ".[test]"
	$(GPU_VERSIONS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests
