#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network (torch, triton, safetensors,
# typer, pytest, pytest-benchmark, hypothesis and transformers already installed):
#   1. installs fastmerge from this checkout (no dependencies fetched);
#   2. runs the GPU tests without Triton's interpreter (tests/test_gpu.py);
#   3. benchmarks the GPU path (benchmarks/test_gpu.py), which also merges SmolLM-135M- and
#      1.1B-shaped pairs on the GPU and compares them with the CPU output (within 1 ulp).
# The numbers go to one file: $1, default gpu-check.md. Takes under 5 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]
# (-P keeps the checkout's root off sys.path: its kernels/ would shadow PyPI's `kernels`.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check.md}")
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

$python -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
    || { echo "gpu_check: installing fastmerge failed" >&2; exit 1; }
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name(0))"

status=0
$python -P -m pytest tests/test_gpu.py -q -p no:cacheprovider -x || status=$?
$python -P -m pytest benchmarks/test_gpu.py -q -p no:cacheprovider \
    --bench-dir "${FASTMERGE_BENCH_DIR:-/tmp/fastmerge-bench}" --bench-report "$out" || status=$?
echo "gpu_check: numbers in $out (tests exit status $status)"
exit $status
