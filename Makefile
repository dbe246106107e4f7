# chat-api: `make demo` starts the service, `make test` runs every check.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo run test check faults bench bench-smoke lock clean

$(VENV)/.installed: requirements.lock pyproject.toml
	@echo "Installing chat-api's dependencies into $(VENV) (about a minute, first time only)..."
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.lock $(VENV)/.installed
	@echo "Installing the test tools into $(VENV) (a minute or two, first time only)..."
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.lock
	touch $@

## Start the service with the offline demo model (no OpenAI key needed).
demo: $(VENV)/.installed
	CHAT_API_DEMO=1 $(BIN)/chat-api serve

## Start the service with the key from OPENAI_API_KEY_CYB_SEC (or .env).
run: $(VENV)/.installed
	$(BIN)/chat-api serve

## Lint, format check, type check and the whole test suite.
test: check

check: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src
	$(BIN)/pytest -rs -n auto --maxprocesses 4 --dist loadfile

## Only the fault-injection suite, at full size.
faults: $(VENV)/.installed-dev
	CHAT_API_FAULTS_FULL=1 $(BIN)/pytest -m faults

## The benchmark suite (several minutes); prints a table and writes bench/results.json.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench

## Re-pin dependencies from pyproject.toml into the lock files.
lock:
	rm -rf /tmp/chat-api-lock && $(PY) -m venv /tmp/chat-api-lock
	/tmp/chat-api-lock/bin/pip install -q . && /tmp/chat-api-lock/bin/pip freeze --exclude chat-api > /tmp/chat-api-rt.txt
	/tmp/chat-api-lock/bin/pip install -q ".[dev]" && /tmp/chat-api-lock/bin/pip freeze --exclude chat-api > /tmp/chat-api-all.txt
	{ echo "# Runtime dependencies, pinned. Regenerate with \`make lock\` after changing pyproject.toml."; cat /tmp/chat-api-rt.txt; } > requirements.lock
	{ echo "# Test and tooling dependencies, pinned; installed on top of requirements.lock."; grep -vxF -f /tmp/chat-api-rt.txt /tmp/chat-api-all.txt; } > requirements-dev.lock

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
