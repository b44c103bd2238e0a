# `make simulate` and `make test` do all set-up on a fresh machine (see launch/setup.sh).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup simulate test bench
setup:
	@bash launch/setup.sh

simulate: setup
	$(BIN)/dimat simulate $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)
