# The README's commands. Each target creates .venv and installs what it needs, so a
# fresh machine with Python 3.10+ and make is enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memguard-installed
BENCH_STAMP := $(VENV)/.memguard-bench-installed

.PHONY: install test lint demo bench docs clean

# The C extension (memguard/_speedups.c) is compiled by the editable install: a change
# to it reinstalls.
$(STAMP): pyproject.toml setup.py memguard/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]" --group dev
	touch $(STAMP)

install: $(STAMP)

# The body tests run a second time on the pure-Python path (no C extension), the one
# installs without a compiler get.
test: $(STAMP)
	$(BIN)/python -m pytest
	MEMGUARD_PURE_PYTHON=1 $(BIN)/python -m pytest -q tests/test_body_asgi.py \
		tests/test_body_property.py tests/test_body_frameworks.py tests/test_body_speedups.py \
		tests/test_probes.py

lint: $(STAMP)
	$(BIN)/ruff check memguard tests examples benchmarks
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m examples.demo

# The servers benchmarks compare memguard with (uWSGI, Granian): only for `make bench`.
# A failed install is reported, not fatal: their rows are then skipped with the reason.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[all,bench]" && touch $(BENCH_STAMP) \
		|| echo "warning: the bench extra (uwsgi, granian) did not install; their rows are skipped"

bench: $(BENCH_STAMP)
	@# wrk (Debian package) drives the end-to-end overhead benchmark; installed once.
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| echo "wrk could not be installed: end-to-end figures will be skipped"
	@# valgrind counts the body guard's instructions (benchmarks/instructions.py).
	@command -v valgrind >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq valgrind) \
		|| echo "valgrind could not be installed: instruction counts will be skipped"
	$(BIN)/python -m benchmarks --quick

# Generated docs (a test fails when they are stale): the options reference from
# memguard/config.py.
docs: $(STAMP)
	$(BIN)/memguard options --markdown > docs/options.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
