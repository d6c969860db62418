# payq: `make demo` runs the main job end to end; `make test` runs the whole suite.
# Both set up what they need themselves (virtualenv, dependencies, database, schema).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo chaos test test-fast lint typecheck bench scale clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/payq demo

chaos: $(STAMP)
	$(BIN)/payq chaos

test: $(STAMP)
	@bash devservices/system-packages.sh
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# payq beside a plain Dramatiq actor and a plain Celery task (benchmarks/results.md).
# Under 15 minutes on 2 cores; benchmarks are not tests: nothing fails on a figure.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

# A fleet of 1-8 worker hosts through a real PgBouncer, measured (benchmarks/scale.md).
scale: $(BENCH_STAMP)
	@bash devservices/system-packages.sh
	$(BIN)/python -m benchmarks.scale

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@rm -f $(VENV)/.bench-installed-* && touch $@

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache *.egg-info
