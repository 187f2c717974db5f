# mamlrun: the ways we work. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MAMLRUN_DATA ?= $(abspath ../shared/data)

.PHONY: help install test test-fast smoke lint format tb bench bench-presets

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install mamlrun with pinned dependencies (CPU or CUDA torch)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"

test:  ## run the whole test suite (what CI runs); -rs shows why a test was skipped
	$(BIN)/python -m pytest -q -rs

test-fast:  ## the tests not marked slow, for the edit loop (79 s on a quiet 2-core machine, 2026-12-04)
	$(BIN)/python -m pytest -q -rs -m "not slow"

smoke:  ## every experiment preset for a few steps on CPU (debug=smoke): train, test, adapt
	@set -e; out=$$(mktemp -d); \
	for preset in conf/experiment/*.yaml; do \
	  name=$$(basename $$preset .yaml); start=$$(date +%s); \
	  case $$name in miniimagenet_*) need=miniimagenet;; tieredimagenet_*) need=tieredimagenet;; \
	    cifarfs_*) need="cifarfs cifar100";; fc100_*) need="fc100 cifar100";; cub_*) need=cub;; \
	    *) need=;; esac; \
	  if [ -n "$$need" ]; then found=; \
	    for dir in $$need; do if [ -d "$$MAMLRUN_DATA/$$dir" ]; then found=$$dir; fi; done; \
	    if [ -z "$$found" ]; then \
	      echo "smoke: $$name skipped (no $$(echo $$need | sed 's| |/ or |g')/ in $$MAMLRUN_DATA; see README, Data)"; \
	      continue; fi; fi; \
	  if $(BIN)/mamlrun train experiment=$$name debug=smoke hydra.run.dir=$$out/$$name \
	      > $$out/$$name.log 2>&1; then \
	    echo "smoke: $$name ok ($$(( $$(date +%s) - start )) s)"; \
	  else tail -5 $$out/$$name.log; echo "smoke: $$name FAILED (log: $$out/$$name.log)"; exit 1; fi; \
	done; echo "smoke: every preset ran; runs and logs in $$out"

lint:  ## ruff check and format check
	$(BIN)/ruff check src tests $(wildcard scripts)
	$(BIN)/ruff format --check src tests $(wildcard scripts)

format:  ## apply ruff's formatting
	$(BIN)/ruff format src tests $(wildcard scripts)

tb:  ## open TensorBoard on the runs under outputs/ and multirun/
	$(BIN)/tensorboard --logdir .

bench:  ## meta-training throughput and memory vs a learn2learn-style reference (writes bench.json)
	$(BIN)/python scripts/bench.py --json bench.json

bench-presets:  ## every Omniglot preset's own workload in every task batching (~25 min on 2 cores)
	$(BIN)/python scripts/bench.py --presets --all-modes --repeats 3 --json bench-presets.json
