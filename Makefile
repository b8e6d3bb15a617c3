# ZoneMTA-py developer commands. See README.md.
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/development.yaml

.PHONY: setup run test lint bench clean

STAMP  := $(VENV)/.setup-done
SETUP_INPUTS := scripts/setup.sh requirements-dev.txt libs/common/pyproject.toml \
	$(wildcard services/*/pyproject.toml) tools/devtools/pyproject.toml

setup:
	scripts/setup.sh
	touch $(STAMP)

# Every other target sets the machine up first when that was never done or is stale.
$(STAMP): $(SETUP_INPUTS)
	scripts/setup.sh
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m zmta_devtools.run --config $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m zmta_devtools.bench $(BENCH_ARGS)

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
