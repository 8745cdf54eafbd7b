# The README's commands. Each target creates .venv and installs what it needs, so a
# fresh machine with Python 3.10+ and make is enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memguard-installed
BENCH_STAMP := $(VENV)/.memguard-bench-installed

.PHONY: install test test-matrix test-extras lint demo bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]" --group dev
	$(BIN)/python -m pip install -q --group uwsgi \
		|| echo "warning: uWSGI did not install (it needs gcc); its tests are skipped"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The whole suite on the oldest and newest supported Pythons found on this machine
# (pyenv's versions, or pythonX.Y on PATH), each in its own .venv-X.Y; it says which ran
# and which were not found. MATRIX="3.10 3.11 3.12 3.13" runs more.
MATRIX ?= 3.10 3.13
test-matrix:
	bash .ci/test-matrix.sh $(MATRIX)

# Each optional extra installed alone in a fresh venv, from the wheel (slow).
test-extras: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/test_extras.py

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
	$(BIN)/python -m benchmarks --quick

# Generated docs (a test fails when they are stale): the options reference from
# memguard/config.py.
docs: $(STAMP)
	$(BIN)/memguard options --markdown > docs/options.md

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache
