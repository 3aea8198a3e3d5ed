# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use (scripts/setup.sh; a no-op when it is up to date).
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) examples/o3_vllm_demo.py

# The Triton interpreter tests need a process started with TRITON_INTERPRET=1, so they are their own pytest run
# (counted as passes there); the main run deselects them and prints the last summary line.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interp tests/kernels
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/unlearn_classification.py
	$(PY) benchmarks/patch_apply.py
	$(PY) benchmarks/vllm_start.py
	$(PY) benchmarks/o3_gate.py
	$(PY) benchmarks/o3_gate_latency.py
	$(PY) benchmarks/o3_vllm_serving.py
	$(PY) benchmarks/masked_attention.py
	$(PY) benchmarks/eraser_quality.py
	$(PY) benchmarks/eraser_unet_step.py
