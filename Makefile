VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check authority_sdk proxy tests
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(VENV)/bin/authority demo

# make bench [BENCH_ARGS=--quick]: full run ~10 min, writes benchmarks/RESULTS.md
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	sh benchmarks/ensure_wrk.sh
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .authority .pytest_cache .mypy_cache .ruff_cache
