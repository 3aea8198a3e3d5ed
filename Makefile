# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use (scripts/setup.sh; a no-op when it is up to date).
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) examples/salun_smollm2_demo.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/unlearn_classification.py
	$(PY) benchmarks/patch_apply.py
	$(PY) benchmarks/vllm_start.py
