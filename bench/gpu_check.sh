#!/usr/bin/env bash
# GPU check of `cmc train` on CUDA with AMP: one script, under 8 minutes on one GPU.
#
#   bench/gpu_check.sh [OUT_DIR]        (default: bench/results/gpu_check)
#
# Needs: this repository, a Python with its requirements and a CUDA build of PyTorch
# (PYTHON, default .venv/bin/python, else python3), one NVIDIA GPU. Not needed: network,
# onnxruntime-gpu, TensorRT (the exported graph runs on ONNX Runtime's CPU provider).
# Reports steps/s and peak GPU memory of the tiny, small and sam-med3d presets, trains the
# small preset for 300 steps with AMP, and checks the exported ONNX fp32 graph against the
# network on the GPU (bench/gpu_check.py says how). Exit 2 without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_check}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch; set PYTHON to the interpreter with cmc's requirements" >&2
  exit 2
fi
if ! "$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device visible to PyTorch {torch.__version__} (built for CUDA "
          f"{torch.version.cuda or 'none: a CPU-only build'}); run this on a host with an "
          "NVIDIA GPU and a CUDA build of PyTorch", file=sys.stderr)
    sys.exit(2)
print(f"gpu_check: {torch.cuda.device_count()} CUDA device(s), using "
      f"{torch.cuda.get_device_name(0)}")
PY
then
  exit 2
fi
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec timeout 480 "$PYTHON" bench/gpu_check.py --out "$OUT" "${@:2}"
