# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-quick docs clean lock sync-policies test-deploy

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11+)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	@scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests scripts
	$(BIN)/ruff format --check sidecar tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP)
	@scripts/ensure-system-deps.sh prometheus chromium
	$(MAKE) lint typecheck
	$(BIN)/pytest -q

bench-quick: $(STAMP)
	$(BIN)/python -m scripts.bench --quick

$(VENV)/.bench-installed: $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test,bench]'
	@touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m scripts.bench

docs: $(STAMP)
	$(BIN)/python -m sidecar.policy.reference docs/policy-reference.md

lock:
	scripts/lock.sh

sync-policies:
	deploy/k8s/sync-policies.sh

test-deploy: $(STAMP)
	$(BIN)/pytest tests/deploy -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
