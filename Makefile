VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-core test-slow lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check authority_sdk proxy tests
	$(PY) -m mypy

# The core suite first (fast: unit, engine, SDK and proxy behaviour), then the slow stages
# (crash tests with real processes killed, schemathesis, client libraries, replicas, browser).
test: lint test-core test-slow

test-core: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/authority demo

# make bench [BENCH_ARGS=--quick]: full run ~10 min, writes benchmarks/RESULTS.md
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	sh benchmarks/ensure_wrk.sh
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .authority .pytest_cache .mypy_cache .ruff_cache
