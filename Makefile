# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.visgen-installed
# torch/torchvision are installed first, pinned to builds a pip cache or mirror usually holds;
# pyproject.toml only asks for ranges. Override e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIPELINE ?= pipelines/shapes-32.yaml
PYTEST_ARGS ?=
# pip retries a refused connection itself but not a download cut off half way ("Connection broken:
# IncompleteRead"), which failed a CI set-up once: run each install up to three times, 15 s apart.
PIP_INSTALL = echo "pip install $(1)"; for try in 1 2 3; do $(BIN)/python -m pip install $(1) && break; \
	if [ $$try = 3 ]; then echo "pip install $(1) failed 3 times" >&2; exit 1; fi; \
	echo "pip install failed (try $$try of 3); retrying in 15 s" >&2; sleep 15; done

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(call PIP_INSTALL,--quiet --upgrade pip)
	@$(call PIP_INSTALL,--quiet --no-compile $(TORCH_SPEC))
	@$(call PIP_INSTALL,--quiet --no-compile -e '.[dev]')
	@# Byte-compile once on every core instead of pip's one file at a time (2:50 -> 2:21 on 2 cores).
	@# Like pip, skip files this Python cannot compile (torch ships tests written for newer ones).
	@$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python jobs/pipeline.py --pipeline $(PIPELINE)

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/lm_decode.py
	$(BIN)/python bench/lm_feed.py

clean:
	rm -rf work .pytest_cache
