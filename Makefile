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

.PHONY: all setup assets demo demo-train lint system-deps test bench gpu-check clean

all: demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# the pre-trained tiny base (about 7 minutes once per machine, then copied from ~/.cache/raytune_qvl/models)
$(ASSETS)/tiny-qwen25vl/MODEL_CARD.md: $(STAMP) $(wildcard raytune_qvl/assets/*.py) configs/tiny/base_training_config.yaml
	$(PY) -m raytune_qvl.tiny $(ASSETS)/tiny-qwen25vl

# the target domain the demo and the tests fine-tune on, with a test split no choice uses
$(ASSETS)/data/forms/train.jsonl: $(STAMP) raytune_qvl/assets/synth.py raytune_qvl/assets/domains.py
	$(PY) -m raytune_qvl.synth $(ASSETS)/data/forms --task ocr_doc --domain forms --train 256 --eval 64 --test 64 --seed 0

assets: $(ASSETS)/tiny-qwen25vl/MODEL_CARD.md $(ASSETS)/data/forms/train.jsonl

# the main job: a staged Optuna + ASHA sweep of Ray Train trials on the tiny CPU default
demo: assets
	$(PY) -m raytune_qvl.sweep search_spaces/tiny_cpu.yaml --overwrite

# one training run of the tiny default (2 Ray workers, DeepSpeed ZeRO-2, LoRA on the forms domain)
demo-train: assets
	$(PY) -m raytune_qvl.train --config configs/tiny/training_config.yaml \
		--lora_config configs/tiny/lora_config.yaml --deepspeed configs/tiny/ds_config_zero2.json --overwrite

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

# the GPU path on a CUDA machine, once (~8 minutes): versions, 3B/7B step throughput, a GPU sweep,
# ZeRO-3 save/reload; bench/results/gpu.json. FlashAttention-2 is measured when installed
# (`.venv/bin/pip install -e '.[gpu]'`). Without a GPU it says so and exits 0.
gpu-check: assets
	$(PY) -m bench.gpu_check

lint: $(STAMP)
	$(PY) -m ruff check raytune_qvl tests bench
	$(PY) -m ruff format --check raytune_qvl tests bench

test: assets lint system-deps
	$(PY) -m pytest

clean:
	rm -rf $(ASSETS) outputs logs ray_results mlflow.db
