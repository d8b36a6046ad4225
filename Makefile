# The two commands a new machine needs: `make demo` (set up + run the main job) and `make test`.
.PHONY: setup demo test test-all

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lopkit demo --out out/demo

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m "slow or not slow"
