# Two commands do everything on a fresh machine:
#   make demo   compile a zoo model for a local cluster, run it, check it, print plan and speed-up
#   make test   run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgepart.demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider $(ARGS)

.PHONY: install demo test
