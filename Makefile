# Every target works from a fresh clone: the virtual environment is made and filled on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest docs demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch, explicitly: a bare requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[bench,baselines,dev,integrations]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q

# The API reference and the docs/ pages (mkdocs.yml); --strict turns every warning (broken link,
# unresolved cross-reference, docstring that disagrees with its signature) into a failure.
# Not --quiet: with it, MkDocs 1.6 no longer counts the warnings and --strict passes anyway.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

test: lint typecheck docs pytest

demo: $(STAMP)
	$(PY) -m mbf_bench.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site build dist
