# eucareg: `make demo` runs the demo, `make test` runs the tests, `make test-slow` the long
# crash and load scenarios (see README.md). The demo needs the lab's Debian packages
# (system-deps); the tests also need BIND 9 for the DNS-SD tests (test-deps), installed with
# its service masked: the tests start named themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow unit integration lint bench system-deps test-deps venv clean

demo: system-deps $(STAMP)
	$(BIN)/eucalab demo

test: test-deps $(STAMP)
	$(BIN)/pytest -m 'not slow'

test-slow: test-deps $(STAMP)
	$(BIN)/pytest -m slow

unit: test-deps $(STAMP)
	$(BIN)/pytest tests/unit tests/test_static.py

integration: test-deps $(STAMP)
	$(BIN)/pytest -m 'not slow' tests/integration

lint: $(STAMP)
	$(BIN)/ruff check eucareg eucalab tests bench
	$(BIN)/ruff format --check eucareg eucalab tests bench
	$(BIN)/mypy

bench: system-deps $(STAMP)
	$(BIN)/python -m bench.run

system-deps:
	@bash scripts/system-deps.sh

test-deps:
	@bash scripts/system-deps.sh --test

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "eucareg needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
