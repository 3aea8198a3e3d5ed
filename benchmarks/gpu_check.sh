#!/usr/bin/env bash
# The GPU half of the kernel work, as one run on a lent CUDA machine (the device tool; CI has no GPU):
# the CUDA parity tests (`-m gpu`: Triton kernels against their torch references, the eraser's processors) and the
# patch-apply benchmarks on the device. Wheels missing from the machine's image travel in .whl/ (device README).
# Writes its tables under ${OUT:-outputs/gpu_check}.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/pipelines/test_attentive_eraser.py \
  2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15
timeout 150 python3 benchmarks/patch_apply.py --device cuda --sizes 128M --dtypes fp32 bf16 --densities 0.5 0.05 \
  --impls triton torch --table both --out "$OUT/patch_apply_cuda" 2>&1 | tee "$OUT/patch_apply_cuda.txt"
timeout 150 python3 benchmarks/patch_apply.py --device cuda --table model --patch-gb 1 --densities 0.5 0.05 \
  --out "$OUT/patch_apply_model" 2>&1 | tee "$OUT/patch_apply_model.txt"
rm -f "$OUT"/*.safetensors
