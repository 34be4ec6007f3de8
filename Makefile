# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean config-reference

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,flower]'
	# ICBM152 template for the anatomical phantom (data files only: nilearn is never imported)
	$(BIN)/python -m pip install -q --no-deps 'nilearn>=0.14.1'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch.py --config configs/demo.py --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# docs/config_reference.md from configs/*.py (tests/test_docs.py checks it is current)
config-reference: $(STAMP)
	$(BIN)/python tools/gen_config_reference.py

clean:
	rm -rf runs .pytest_cache
