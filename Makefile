# Two commands do everything on a fresh machine: `make run` (the main federated FAR simulation) and `make test`.
# The venv is (re)built when pyproject.toml changes. torch is installed first and pinned: this machine keeps the
# CPU wheel of torch 2.13.0 on disk, and an unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedfar-installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: setup run test bench mutants
setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedfar run configs/quickstart.toml

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/fedfar bench

# Mutation testing of the arithmetic's rooms against the fast tests ([tool.mutmut] in pyproject.toml). Slow (hours
# on 2 cores; finished mutants are kept when it is restarted), not part of `make test` or CI.
# The tests run from mutants/, so the shared GLUE folder is named for them.
mutants: $(STAMP)
	FEDFAR_GLUE_DIR=$${FEDFAR_GLUE_DIR:-$(CURDIR)/../shared/data/glue} $(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut export-cicd-stats
	$(PY) scripts/mutation_score.py
