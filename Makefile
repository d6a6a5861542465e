# Two commands do everything on a fresh machine:
#   make demo       compile a zoo model for a local cluster, run it, check it, print plan and speed-up
#   make test       the fast test tier (no slow, root-only or timing-sensitive tests)
# and a few more:
#   make test-all   every test
#   make lint       ruff check (pyflakes and syntax errors)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FAST := not slow and not root and not timing

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgepart.demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider -m "$(FAST)" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check edgepart tests benchmarks

.PHONY: install demo test test-all lint
