# Two commands on a fresh machine (Debian/Ubuntu with python3):
#   make run    install into .venv and start the service on $HOST:$PORT (default 127.0.0.1:8000)
#   make test   install, install the test servers (PostgreSQL, a FHIR server), run every test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test test-deps validate bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m cds_hooks_service serve --host $(HOST) --port $(PORT)

test-deps:
	bash scripts/install-test-deps.sh

test: install test-deps
	$(BIN)/python -m cds_hooks_service validate
	$(BIN)/python -m pytest -q

validate: install
	$(BIN)/python -m cds_hooks_service validate
	$(BIN)/python -m cds_hooks_service test

bench: install
	$(BIN)/python bench/hook_latency.py

clean:
	rm -rf $(VENV) .venv-sekmet instance .pytest_cache
