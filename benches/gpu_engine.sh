#!/usr/bin/env bash
# GPU variant of benches/bench_engine.py: a random-weight model with Qwen2.5-7B's shape in bf16
# (about 15 GB of weights; no download). Output tokens/s at 1, 8, 32 and 64 concurrent sequences
# against sequential and static-batch model.generate, the engine's step overhead, and the TTFT of
# a 90%-cached 4k prompt against transformers over an in-memory DynamicCache, in one run; the
# paged attention kernels (Triton prefill + decode) are checked against the reference first.
#   benches/gpu_engine.sh              # from the repository root, on a machine with one CUDA GPU
# Override any BENCH_ENGINE_* variable (see the bench's docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_ENGINE_MODEL="${BENCH_ENGINE_MODEL:-qwen2.5-7b-shape}"
export BENCH_ENGINE_SEQS="${BENCH_ENGINE_SEQS:-1,8,32,64}"
export BENCH_ENGINE_DEVICE="${BENCH_ENGINE_DEVICE:-cuda}"
export BENCH_ENGINE_DTYPE="${BENCH_ENGINE_DTYPE:-bfloat16}"
export BENCH_ENGINE_ROUNDS="${BENCH_ENGINE_ROUNDS:-5}"
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# kvcache.kernels is the top-level kernels/ folder, mapped by pyproject: install in place if needed.
if ! "$PY" -c "import kvcache.kernels" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_paged.py tests/test_kernels_attention.py
"$PY" benches/bench_engine.py
