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

.PHONY: all setup assets demo demo-train lint test bench clean

all: demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

$(ASSETS)/tiny-qwen25vl/config.json: $(STAMP) raytune_qvl/tiny.py
	$(PY) -m raytune_qvl.tiny $(ASSETS)/tiny-qwen25vl

$(ASSETS)/data/ocr_doc/train.jsonl: $(STAMP) raytune_qvl/synth.py
	$(PY) -m raytune_qvl.synth $(ASSETS)/data/ocr_doc --task ocr_doc --train 256 --eval 32 --seed 0

assets: $(ASSETS)/tiny-qwen25vl/config.json $(ASSETS)/data/ocr_doc/train.jsonl

# the main job: a staged Optuna + ASHA sweep of Ray Train trials on the tiny CPU default
demo: assets
	$(PY) -m raytune_qvl.sweep search_spaces/tiny_cpu.yaml --overwrite

# one training run of the tiny default (2 Ray workers, DeepSpeed ZeRO-2)
demo-train: assets
	$(PY) -m raytune_qvl.train --config configs/tiny/training_config.yaml \
		--lora_config configs/tiny/lora_config.yaml --deepspeed configs/ds_config_zero2.json --overwrite

lint: $(STAMP)
	$(PY) -m ruff check raytune_qvl tests bench

test: assets lint
	$(PY) -m pytest

clean:
	rm -rf $(ASSETS) outputs logs ray_results mlflow.db
