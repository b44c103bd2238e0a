# `make simulate` and `make test` do all set-up on a fresh machine (see launch/setup.sh).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup simulate test test-fast bench
setup:
	@bash launch/setup.sh

simulate: setup
	$(BIN)/dimat simulate $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

# the unit layer: no subprocesses, no real servers (tests/conftest.py guards it); about a minute
test-fast: setup
	DIMAT_TEST_LAYER=unit $(BIN)/python -m pytest -q -m "not integration and not slow" $(ARGS)
