# hpc_gan: the two commands are `make demo` and `make test`; everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0

.PHONY: venv demo test test-unit test-multiprocess test-slurm bench clean

venv: $(STAMP)

# torch goes first so that deepspeed and the package see it and never pull a CUDA build on CPU machines.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet deepspeed==0.19.8
	$(PIP) install --quiet mpi4py mpich
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hpc_gan.demo

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m unit

test-multiprocess: $(STAMP)
	$(PY) -m pytest -m multiprocess

# a real single-host SLURM cluster (tests/slurm/cluster.sh; needs root, installs Debian's packages)
test-slurm: $(STAMP)
	$(PY) -m pytest -m slurm tests/slurm

bench: $(STAMP)
	$(PY) bench/data_loader.py

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
