# Common commands. `make test` is what CI runs (see .ci/run and README).
PY ?= .venv/bin/python

.PHONY: venv install test lint format bench bench-quick bench-suite

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

bench-suite:
	$(PY) -m pytest bench --benchmark-enable -q
