# raytune_qvl: `make demo` runs the main job on the tiny CPU default; `make test` runs the suite.
# Both create and use .venv in the repository root.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS := .assets
ARCH := $(shell uname -m)
# torch and torchvision as a matched pair (the real Qwen2_5_VLProcessor needs torchvision)
ifeq ($(ARCH),aarch64)
TORCH_PAIR := torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: all setup assets demo demo-train lint system-deps test bench clean

all: demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

$(ASSETS)/tiny-qwen25vl/config.json: $(STAMP) raytune_qvl/assets/tiny.py
	$(PY) -m raytune_qvl.tiny $(ASSETS)/tiny-qwen25vl

$(ASSETS)/data/ocr_doc/train.jsonl: $(STAMP) raytune_qvl/assets/synth.py
	$(PY) -m raytune_qvl.synth $(ASSETS)/data/ocr_doc --task ocr_doc --train 256 --eval 32 --seed 0

assets: $(ASSETS)/tiny-qwen25vl/config.json $(ASSETS)/data/ocr_doc/train.jsonl

# the main job: a staged Optuna + ASHA sweep of Ray Train trials on the tiny CPU default
demo: assets
	$(PY) -m raytune_qvl.sweep search_spaces/tiny_cpu.yaml --overwrite

# one training run of the tiny default (2 Ray workers, DeepSpeed ZeRO-2)
demo-train: assets
	$(PY) -m raytune_qvl.train --config configs/tiny/training_config.yaml \
		--lora_config configs/tiny/lora_config.yaml --deepspeed configs/ds_config_zero2.json --overwrite

# Debian packages some tests use: headless Chromium + chromedriver (the MLflow UI test) and
# PostgreSQL (a tracking server's backend). Installed when running as root; otherwise those
# tests are skipped, saying why.
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		missing=""; \
		command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
		command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
		ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
		if [ -n "$$missing" ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		fi; \
	else \
		echo "not root: the browser and PostgreSQL tests need chromium, chromium-driver and postgresql installed"; \
	fi

# benchmarks against plain baselines (~1 hour on 2 cores): bench/results/latest.json, BENCHMARKS.md
# (BENCH_ARGS=--quick: a smoke run with fewer repeats and trials)
bench: assets
	$(PY) -m bench.run_bench $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check raytune_qvl tests bench
	$(PY) -m ruff format --check raytune_qvl tests bench

test: assets lint system-deps
	$(PY) -m pytest

clean:
	rm -rf $(ASSETS) outputs logs ray_results mlflow.db
