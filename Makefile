# The two commands of the README: `make demo` runs the main job, `make test` the whole suite.
# Each first creates/updates the virtual environment and the demo data (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist processes, each running whole test files (module fixtures stay shared), the longest
# files first (tests/conftest.py's LONGEST_FIRST, not xdist's reordering); 0: one process
PYTEST_WORKERS ?= 2
ARGS ?=

.PHONY: setup demo test clean

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup
	$(PY) -m pipelines.cli demo $(ARGS)

# pytest exits 5 when it collects no test: that is reported, not treated as a failure
test: setup
	@$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; rc=0; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache .hypothesis
