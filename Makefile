# Two entry points for a newcomer (see README):
#   make demo   set up .venv and run the main job end to end on local defaults (CPU, offline)
#   make test   set up .venv and run lint + the test suite
#   make down   stop the servers `make demo` started
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-cli study down bench lint clean mutants

setup: $(STAMP)

# pip (not uv/poetry): only pip sees the torch 2.14.1 / torchvision 0.29.1 wheels on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast,mlops,dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# Two pytest-xdist workers, one per core (one OpenMP thread each, tests/conftest.py); tests
# that share a module's servers or fixtures stay together (xdist_group), longest first.
test: lint
	$(PY) -m pytest -n 2 --dist loadgroup

# The main job through Prefect: local S3, MLflow and Prefect servers + a worker (`aot services up`),
# deploy aot/train-eval, run it and wait; everything stays up for browsing until `make down`.
demo: setup
	./scripts/demo.sh

# The seeded study (configs/study-digits.yaml, 18 models + a guided arm) as the same deployment,
# its models placed by the work queue; then docs/results.md and its pictures from the flow's outputs.
study: setup
	DEMO_PARAMS=study-digits DEMO_OUT=study DEMO_OVERRIDES='{}' ./scripts/demo.sh
	cp study/study/results.md docs/results.md
	rm -rf docs/results && cp -r study/study/results docs/results

# The same pipeline without servers (embedded MLflow store ./mlflow.db).
demo-cli: setup
	$(VENV)/bin/aot demo --out demo

down:
	test ! -x $(VENV)/bin/aot || $(VENV)/bin/aot services down

bench: setup
	$(PY) benchmarks/pairing.py --quick
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/tracking.py

# Mutation testing of the core modules (mutmut 3, ~30 min on 2 idle cores; not part of CI).
# MODULES=loss make mutants runs some; results in .mutants/summary.json, see docs/mutation.md.
mutants: setup
	OMP_NUM_THREADS=1 AOT_TEST_THREADS=1 $(PY) scripts/mutants.py $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo .mutants
