#!/usr/bin/env bash
# GPU variant of benches/bench_hf.py: a random-weight model with Qwen2.5-7B's shape in bf16
# (about 15 GB of weights; no download), prompts of 8k and 32k tokens at 90% prefix hit, the
# engine against no reuse and against a hand-written restore, in one run.
#   benches/gpu_hf.sh                  # from the repository root, on a machine with one CUDA GPU
# Override any BENCH_HF_* variable (see the bench's docstring), e.g. BENCH_HF_HITS=0,0.5,0.9,0.99.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_HF_MODEL="${BENCH_HF_MODEL:-qwen2.5-7b-shape}"
export BENCH_HF_LENGTHS="${BENCH_HF_LENGTHS:-8192,32768}"
export BENCH_HF_HITS="${BENCH_HF_HITS:-0.9}"
export BENCH_HF_DEVICE="${BENCH_HF_DEVICE:-cuda}"
export BENCH_HF_DTYPE="${BENCH_HF_DTYPE:-bfloat16}"
export BENCH_HF_ROUNDS="${BENCH_HF_ROUNDS:-5}"
export BENCH_HF_PLOT="${BENCH_HF_PLOT:-${OUT:-/tmp}/hf_ttft_gpu.png}"
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# kvcache.kernels is the top-level kernels/ folder, mapped by pyproject: install in place if needed.
if ! "$PY" -c "import kvcache.kernels" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
# bf16 on the GPU: cached-suffix logits within the documented tolerance of the full run.
"$PY" -m pytest -q -p no:cacheprovider tests/test_hf_bf16.py
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    "$PY" -m pytest benches/bench_hf.py --benchmark-only -q -p no:cacheprovider --benchmark-columns=min,median
else
    "$PY" benches/bench_hf.py
fi
