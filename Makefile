# Two commands on a fresh machine: `make demo` and `make test`. Both make .venv and install what they need.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

# Two test workers per core: much of a test's time is spent waiting on PostgreSQL, S3 or a child process.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))

# Most tests start the scripts as processes, often several times: each must load bytecode, not compile every
# module again, even where the environment sets PYTHONDONTWRITEBYTECODE.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The full runs take minutes and several GB of temporary space; --quick is what `make test` runs.
BENCHMARKS := bench/help_bench.py bench/config_bench.py bench/db_bench.py bench/code_bench.py bench/remote_bench.py bench/retention_bench.py

bench: $(STAMP)
	for benchmark in $(BENCHMARKS); do $(VENV)/bin/python $$benchmark || exit 1; done

bench-quick: $(STAMP)
	for benchmark in $(BENCHMARKS); do $(VENV)/bin/python $$benchmark --quick || exit 1; done

clean:
	rm -rf $(VENV) .venv-system .venv-newest .pytest_cache .ruff_cache
