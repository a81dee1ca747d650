# mnist-slurm: `make help` lists the targets. Every target installs the project first if needed.
MODEL ?= mlp
DATA ?= mnist
ARGS ?=
PYTHON := .venv/bin/python
VENV := .venv/.installed
# TORCH_CUDA=cu126 (or cu130, cpu): that build of torch and torchvision, from PyTorch's own wheel index, instead
# of PyPI's default (CUDA 13.0: drivers >= 580, no V100). The versions are setup.cfg's.
TORCH_CUDA ?=
TORCH_VERSION := $(shell sed -n 's/^ *torch==//p' setup.cfg)
TORCHVISION_VERSION := $(shell sed -n 's/^ *torchvision==//p' setup.cfg)
TORCH_BUILD = $(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)+$(TORCH_CUDA) \
	torchvision==$(TORCHVISION_VERSION)+$(TORCH_CUDA) --index-url https://download.pytorch.org/whl/$(TORCH_CUDA)

.DEFAULT_GOAL := help
.PHONY: help install run data test lint bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: MODEL=$(MODEL) DATA=$(DATA) ARGS='<more overrides>' SOURCE=<folder for make data>" \
		"TORCH_CUDA=<cu126|cu130|cpu for make install> NODES=<nodes for make cluster-up>"

install: $(VENV) ## create .venv and install the project into it (editable); TORCH_CUDA=cu126: torch for older drivers
ifdef TORCH_CUDA
	$(TORCH_BUILD)
endif

# editable_mode=compat puts the checkout on sys.path, so Hydra finds hydra_plugins/ by walking it
$(VENV): setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(if $(TORCH_CUDA),$(TORCH_BUILD))
	$(PYTHON) -m pip install --quiet -e '.[test,tensorboard]' --config-settings editable_mode=compat
	touch $@

run: $(VENV) ## train MODEL on DATA right here: make run MODEL=cnn ARGS='trainer.epochs=1'
	$(PYTHON) -m mnist.run model=$(MODEL) data=$(DATA) $(ARGS)

data: $(VENV) ## fetch and check DATA into data.root (SOURCE=<folder> copies local IDX files instead)
ifdef SOURCE
	$(PYTHON) -m mnist.data copy $(SOURCE) data=$(DATA) $(ARGS)
else
	$(PYTHON) -m mnist.data download data=$(DATA) $(ARGS)
endif

# Most tests wait on Slurm or on a subprocess: 3 workers (one file each at a time) keep 2 cores busy.
TEST_WORKERS ?= 3
test: $(VENV) ## run the test suite (TEST_WORKERS=3 processes)
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(VENV) ## ruff check: pycodestyle, pyflakes, import order, bugbear, pyupgrade (pyproject.toml)
	$(PYTHON) -m ruff check .

bench: $(VENV) ## the performance record: training vs the course's pipeline and the compute floor, speed switches, data-parallel steps, submitting (ARGS='--device cuda' on a GPU node; '--help')
	$(PYTHON) -m benchmarks.train_speed $(ARGS)

JOB ?=
.PHONY: submit dry-run status watch show resubmit logs cancel report slurm-scripts
submit: $(VENV) ## submit MODEL on DATA to Slurm (login node): make submit MODEL=cnn ARGS='resources=gpu'
	$(PYTHON) -m mnist.run model=$(MODEL) data=$(DATA) launcher=slurm $(ARGS)

dry-run: $(VENV) ## print the sbatch script `make submit` would submit, submit nothing
	@$(PYTHON) -m mnist.run model=$(MODEL) data=$(DATA) launcher=slurm dry_run=true $(ARGS)

status: $(VENV) ## the jobs submitted from here: state, elapsed, node, last log line, run folder
	@$(PYTHON) -m mnist.jobs

logs: $(VENV) ## the end of a job's log: make logs JOB=123456 (default: the latest job)
	@$(PYTHON) -m mnist.jobs tail $(JOB)

watch: $(VENV) ## the status table, redrawn every 5 s until every job has ended
	@$(PYTHON) -m mnist.jobs --watch

show: $(VENV) ## one job in full (state, cause and fix, usage, run folder, history): make show JOB=123456
	@$(PYTHON) -m mnist.jobs show $(JOB)

resubmit: $(VENV) ## rerun what did not complete, as one array: make resubmit JOB=<job, array or sweep folder> ARGS='--more'
	@$(PYTHON) -m mnist.jobs resubmit $(JOB) $(ARGS)

cancel: $(VENV) ## cancel a job: make cancel JOB=123456
	@$(PYTHON) -m mnist.jobs cancel $(JOB)

RUN ?=
report: $(VENV) ## table, report.csv and loss/accuracy PNGs of a run or sweep: make report RUN=multirun/<date>/<time> (default: the latest)
	@$(PYTHON) -m mnist.report $(RUN) $(ARGS)

slurm-scripts: $(VENV) ## regenerate slurm/mlp.sh and slurm/cnn.sh from conf/
	$(PYTHON) -m mnist.launch.scripts

clean: ## remove run outputs (outputs/, multirun/); keeps data/ and .venv
	rm -rf outputs multirun

CLUSTER_DIR ?= .cluster
NODES ?= 1
.PHONY: cluster-up cluster-down
cluster-up: $(VENV) ## start a real Slurm here, NODES=1 node(s) (Debian's slurmctld/slurmd/munge); prints the export line
	@$(PYTHON) cluster/localslurm.py up --dir $(CLUSTER_DIR) --nodes $(NODES)

cluster-down: $(VENV) ## stop the Slurm that cluster-up started
	@$(PYTHON) cluster/localslurm.py down --dir $(CLUSTER_DIR)
