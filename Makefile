# mnist-slurm: `make help` lists the targets. Every target installs the project first if needed.
MODEL ?= mlp
DATA ?= mnist
ARGS ?=
PYTHON := .venv/bin/python
VENV := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help install run data test bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: MODEL=$(MODEL) DATA=$(DATA) ARGS='<more overrides>' SOURCE=<folder for make data>"

install: $(VENV) ## create .venv and install the project into it (editable)

$(VENV): setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV) ## train MODEL on DATA right here: make run MODEL=cnn ARGS='trainer.epochs=1'
	$(PYTHON) -m mnist.run model=$(MODEL) data=$(DATA) $(ARGS)

data: $(VENV) ## fetch and check DATA into data.root (SOURCE=<folder> copies local IDX files instead)
ifdef SOURCE
	$(PYTHON) -m mnist.data copy $(SOURCE) data=$(DATA) $(ARGS)
else
	$(PYTHON) -m mnist.data download data=$(DATA) $(ARGS)
endif

test: $(VENV) ## run the test suite
	$(PYTHON) -m pytest $(ARGS)

bench: $(VENV) ## measure training speed against the course's pipeline and the compute floor
	$(PYTHON) -m benchmarks.train_speed $(ARGS)

clean: ## remove run outputs (outputs/, multirun/); keeps data/ and .venv
	rm -rf outputs multirun

CLUSTER_DIR ?= .cluster
.PHONY: cluster-up cluster-down
cluster-up: $(VENV) ## start a real one-node Slurm here (Debian's slurmctld/slurmd/munge); prints the export line
	@$(PYTHON) cluster/localslurm.py up --dir $(CLUSTER_DIR)

cluster-down: $(VENV) ## stop the one-node Slurm that cluster-up started
	@$(PYTHON) cluster/localslurm.py down --dir $(CLUSTER_DIR)
