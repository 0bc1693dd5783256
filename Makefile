# One way to run each thing; CI (.ci/run) calls these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Written after a successful install; older than pyproject.toml or constraints.txt means
# the environment is out of date. Every target that runs the project's tools depends on it,
# so `make up` and `make test` work on a fresh clone without `make install` first.
INSTALLED := $(VENV)/.installed

.PHONY: install lock docs protos check-protos lint format typecheck check test test-unit test-integration test-e2e up bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned (torch==2.13.0, the CPU build) through the project's `ml` extra; every
# other dependency through constraints.txt (see `lock`).
install: $(INSTALLED)

$(INSTALLED): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

# Re-resolve every dependency from pyproject.toml in a scratch environment and pin the
# result in constraints.txt (and the GPU images' constraints derived from it); run the
# tests before committing them.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv
	$(PYTHON) deploy/docker/gpu_constraints.py

protos: $(INSTALLED)
	$(BIN)/python scripts/gen_protos.py

# Fails when the checked-in stubs differ from what the pinned generator produces.
check-protos: protos
	@git diff --exit-code --stat -- libs/ftops || (echo "Generated stubs changed: run 'make protos' and commit" && exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- libs/ftops)" || (echo "Untracked generated stubs: run 'make protos' and commit" && git status --short -- libs/ftops && exit 1)

docs: $(INSTALLED)
	$(BIN)/python scripts/gen_config_docs.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(INSTALLED)
	$(BIN)/mypy libs/ftops_runtime libs/ftops_devstack libs/ftops_tinymodel libs/ftops_client libs/ftops_cli services tests bench scripts

check: $(INSTALLED) check-protos lint typecheck

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(INSTALLED)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(INSTALLED)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

up: $(INSTALLED)
	$(BIN)/ftops-dev up

bench: $(INSTALLED)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .ftops .pytest_cache .mypy_cache .ruff_cache
