# ZoneMTA-py developer commands. See README.md.
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/development.yaml

.PHONY: setup lock run test test-fast lint bench bench-huge bench-shaping images clean

STAMP  := $(VENV)/.setup-done
SETUP_INPUTS := scripts/setup.sh constraints.txt requirements-dev.txt libs/common/pyproject.toml \
	$(wildcard services/*/pyproject.toml) tools/devtools/pyproject.toml tools/cli/pyproject.toml

setup:
	scripts/setup.sh
	touch $(STAMP)

# Every other target sets the machine up first when that was never done or is stale.
$(STAMP): $(SETUP_INPUTS)
	scripts/setup.sh
	touch $(STAMP)

# constraints.txt anew from the projects' ranges and requirements-dev.txt, keeping the versions it
# has where they still fit; `make lock UPGRADE=1` takes the newest instead. Needs the package index.
# No setup first: that installs the lock, which may be what needs mending.
lock:
	$(if $(wildcard $(PY)),$(PY),python3) scripts/lock.py $(if $(UPGRADE),--upgrade)

run: $(STAMP)
	$(PY) -m zmta_devtools.run --config $(CONFIG)

# Test processes (pytest-xdist). The deployment tests mostly wait on their servers, so three
# processes take less time than two even on two cores (about 140 s against 170 s here). A
# module's tests stay in one process (--dist loadscope): they may share a module-scoped
# deployment. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
PYTEST := $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadscope

# What CI runs (.ci/run): the checks of `make lint`, then every test.
test: lint
	$(PYTEST)

# Unit tests and the integration tests that start no whole deployment (marked in tests/conftest.py).
test-fast: $(STAMP)
	$(PYTEST) -m "not deployment" tests/unit tests/integration

# The same checks as .pre-commit-config.yaml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m zmta_devtools.bench $(BENCH_ARGS)
	$(PY) -m zmta_devtools.bench_dkim

# A campaign to one provider that pushes back: traffic shaping off, on, and limits tuned by hand.
bench-shaping: $(STAMP)
	$(PY) -m zmta_devtools.bench_shaping $(BENCH_ARGS)

# One 1 GiB message through every service, with each service's peak memory, then through Postfix.
bench-huge: $(STAMP)
	$(PY) -m zmta_devtools.bench_huge $(BENCH_ARGS)

# One image per service, all from the one Dockerfile (--build-arg SERVICE=<name>), as
# $(IMAGE_REPO)/<name>:$(IMAGE_TAG), with the first container engine that works (ENGINE=podman
# to choose); skipped when none does.
IMAGE_REPO ?= zonemta-py
IMAGE_TAG  ?= 0.1.0
IMAGES     := ingest queue sender bounce api
images:
	@engine="$(ENGINE)"; \
	if [ -z "$$engine" ]; then \
		for candidate in docker podman; do \
			if command -v $$candidate >/dev/null 2>&1 && $$candidate info >/dev/null 2>&1; then engine=$$candidate; break; fi; \
		done; \
	fi; \
	if [ -z "$$engine" ]; then echo "images: no working container engine (docker or podman with its daemon running): skipped"; exit 0; fi; \
	for service in $(IMAGES); do \
		$$engine build --build-arg SERVICE=$$service -f Dockerfile -t $(IMAGE_REPO)/$$service:$(IMAGE_TAG) . || exit 1; \
	done; \
	for service in $(IMAGES); do $$engine image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(IMAGE_REPO)/$$service:$(IMAGE_TAG); done

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
