# `make demo` and `make test` each build their own virtual environment in .venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean chromium mpi sshd slurm

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m ipyparallel_lite.demo

test: mpi sshd slurm chromium $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks hatch_build.py
	$(BIN)/python -m pytest

# the JupyterLab panel's browser test drives Debian's chromium: installed here when absent
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs chromium for its browser test: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

# the MPI launcher's tests run Debian's OpenMPI (mpiexec; mpi4py builds against libopenmpi-dev)
mpi:
	@command -v mpiexec >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null; \
	  else \
	    echo "make test needs mpiexec for the MPI launcher's tests: sudo apt-get install openmpi-bin libopenmpi-dev" >&2; exit 1; \
	  fi; }

# the SSH launcher's tests start Debian's OpenSSH server (their own sshd, on a free port of
# 127.0.0.1) and connect with its client
sshd:
	@{ [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null; \
	  else \
	    echo "make test needs sshd and ssh for the SSH launcher's tests: sudo apt-get install openssh-server openssh-client" >&2; exit 1; \
	  fi; }

# the Slurm launcher's tests start Debian's Slurm (munged, slurmctld, slurmd: a single-node
# cluster of their own, as root) and submit with its sbatch
slurm:
	@{ command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	  else \
	    echo "make test needs Slurm and munge for the Slurm launcher's tests (run as root): sudo apt-get install slurm-wlm munge" >&2; exit 1; \
	  fi; }

bench: $(BIN)/.bench-installed
	$(BIN)/python -m benchmarks

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks hatch_build.py

clean:
	rm -rf $(VENV)
