VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-core test-slow test-openai2 test-libs lint demo bench clean

# The libraries built on openai that tests/libs drives, per openai major (each venv pinned
# by constraints/openaiN.txt). Their top-level modules must import there: a skip would
# otherwise pass for a run.
OA2_VENV := .venv-openai2
LIBS3_VENV := .venv-libs3
LIBS_OPENAI2 := openai-agents 'pydantic-ai-slim[openai]' langchain-openai langchain \
	llama-index-llms-openai llama-index-core instructor
LIBS_OPENAI3 := openai-agents 'pydantic-ai-slim[openai]' langchain-openai langchain
REQUIRE_OPENAI2 := agents,pydantic_ai,langchain_openai,langchain,langchain_core,llama_index,instructor
REQUIRE_OPENAI3 := agents,pydantic_ai,langchain_openai,langchain,langchain_core

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
# (processes killed mid-run, schemathesis, replicas, browser), then the SDK and the client
# libraries on openai 2.x, then the libraries that need openai 3.x.
test: lint test-core test-slow test-openai2 test-libs

test-core: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow and not libs" -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow and not libs" -p no:cacheprovider

$(OA2_VENV)/.installed: pyproject.toml constraints/openai2.txt
	test -x $(OA2_VENV)/bin/python || python3 -m venv $(OA2_VENV)
	$(OA2_VENV)/bin/python -m pip install -q --upgrade pip
	$(OA2_VENV)/bin/python -m pip install -q -c constraints/openai2.txt -e '.[dev]' $(LIBS_OPENAI2)
	touch $@

$(LIBS3_VENV)/.installed: pyproject.toml constraints/openai3.txt
	test -x $(LIBS3_VENV)/bin/python || python3 -m venv $(LIBS3_VENV)
	$(LIBS3_VENV)/bin/python -m pip install -q --upgrade pip
	$(LIBS3_VENV)/bin/python -m pip install -q -c constraints/openai3.txt -e '.[dev]' $(LIBS_OPENAI3)
	touch $@

# The core suite (the SDK's included) on openai 2.x / httpx, with its libraries.
test-openai2: $(OA2_VENV)/.installed
	$(OA2_VENV)/bin/python -m mypy
	AUTHORITY_REQUIRE_LIBS=$(REQUIRE_OPENAI2) $(OA2_VENV)/bin/python -m pytest -n 2 -q \
		-m "not slow" -p no:cacheprovider

# The libraries that need openai 3.x.
test-libs: $(LIBS3_VENV)/.installed
	AUTHORITY_REQUIRE_LIBS=$(REQUIRE_OPENAI3) $(LIBS3_VENV)/bin/python -m pytest -n 2 -q \
		-p no:cacheprovider tests/libs

demo: $(STAMP)
	$(VENV)/bin/authority demo

# make bench [BENCH_ARGS=--quick]: full run ~10 min, writes benchmarks/RESULTS.md
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	sh benchmarks/ensure_wrk.sh
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/pg_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(OA2_VENV) $(LIBS3_VENV) .authority .pytest_cache .mypy_cache .ruff_cache
