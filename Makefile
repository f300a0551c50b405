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

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf data .venv .pytest_cache .mypy_cache .ruff_cache
