# `make demo` and `make test` each build their own virtual environment in .venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean test-programs

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

test: test-programs $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks hatch_build.py
	$(BIN)/python -m pytest

# programs the tests run for real, from Debian's packages, installed here when absent (one
# apt-get for all): chromium (the panel's browser test), OpenMPI (mpiexec; mpi4py builds
# against libopenmpi-dev), OpenSSH (the SSH launcher's tests start their own sshd on
# 127.0.0.1), Slurm and munge (a single-node cluster the Slurm tests start, as root)
TEST_PROGRAMS := chromium:chromium mpiexec:openmpi-bin,libopenmpi-dev \
	/usr/sbin/sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client \
	sbatch:slurm-wlm /usr/sbin/slurmctld:slurm-wlm /usr/sbin/slurmd:slurm-wlm /usr/sbin/munged:munge

test-programs:
	@missing=""; for entry in $(TEST_PROGRAMS); do \
	  command -v "$${entry%%:*}" >/dev/null 2>&1 || missing="$$missing $$(echo $${entry#*:} | tr , ' ')"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "make test needs Debian packages:$$missing (sudo apt-get install$$missing)" >&2; exit 1; \
	fi

bench: $(BIN)/.bench-installed
	$(BIN)/python -m benchmarks

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks hatch_build.py

clean:
	rm -rf $(VENV)
