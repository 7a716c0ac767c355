#!/usr/bin/env bash
# The GPU check of shardlib.cuda (issue 10), one short run (< 5 min on an H100/H200):
# versions, the GPU test tier (every kernel against its torch reference, bitwise for the
# quantization kernels; fused AdamW; bad input), then benchmarks/kernels.py at the issue's
# sizes (GB/s against a device copy at 256 MiB, fused AdamW against torch's, compressed
# against plain all-gather). Nothing is installed: it runs the checkout with the machine's
# python3, torch and cuda-python. Where $OUT is set, the log is also written there.
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SHARDLIB_CACHE="$(mktemp -d)"
export SHARDLIB_CACHE
{
  echo "# bash benchmarks/gpu_check.sh   ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  nvidia-smi -L || true
  "$PY" - <<'PY'
import importlib.metadata as md, torch
for name in ("torch", "cuda-core", "cuda-bindings", "nvidia-cuda-nvrtc"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
print("torch.cuda:", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import shardlib as sl
print("sl.cuda.available():", sl.cuda.available(), sl.cuda.gpu_problem())
PY
  echo "## GPU tier (tests/test_cuda_gpu.py) and the CPU tier (tests/test_cuda_kernels.py)"
  timeout 200 "$PY" -m pytest tests/test_cuda_gpu.py tests/test_cuda_kernels.py -q -rs \
    -p no:cacheprovider
  echo "pytest exit: $?"
  echo "## benchmarks/kernels.py"
  timeout 150 "$PY" benchmarks/kernels.py --size-mib 256 --reps 20
  echo "benchmark exit: $?"
} 2>&1 | tee "$LOG"
