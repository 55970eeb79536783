# metaopt: `make run` (the main job) and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install run test test-all bench-digits continual

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	# torch 2.14.1 with torchvision 0.29.1: the pair PyPI's torchvision builds against.
	$(VENV)/bin/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(VENV)/bin/pip install -e ".[experiments,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install metaopt with the experiment stack

run: $(STAMP)  ## the main job: a short real experiment on CPU or GPU, its plot and a one-line summary
	$(PY) -m experiments.quickstart

bench-digits: $(STAMP)  ## every optimizer config on the embedded digits data (CPU): results/digits_optimizers.md
	OMP_NUM_THREADS=1 $(PY) scripts/bench_digits_optimizers.py

continual: $(STAMP)  ## MetaOptimize vs tuned fixed steps vs IDBD on two non-stationary streams (CPU, ~1.5 h on 2 cores): results/continual/
	OMP_NUM_THREADS=1 $(PY) -m experiments.continual

test: $(STAMP)  ## the fast tests (no GPU, no network, no W&B account)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## every test, the slow ones too
	$(PY) -m pytest -q -m ""
