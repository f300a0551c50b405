# Targets read like the monitoring mixins': generate, lint, test.
PY := .venv/bin/python
.PHONY: setup run generate lint test test-fast bench clean

setup:
	@scripts/setup.sh

run: setup
	@scripts/run.sh

generate: setup
	$(PY) -m exporter.gendocs
	$(PY) -m grafana.generate

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

# The benchmarks of docs/benchmarks.md one after another, as documented there (each prints its
# own report; rules_scale runs for minutes). One alone: .venv/bin/python bench/<name>.py
bench: setup
	$(PY) bench/ingest_vs_mtail.py
	$(PY) bench/taskdb_vs_sql_exporter.py
	$(PY) bench/instrumentation_overhead.py
	$(PY) bench/rules_scale.py
	$(PY) bench/api_wrk.py --duration 15

clean:
	rm -rf data .venv .pytest_cache .mypy_cache .ruff_cache
