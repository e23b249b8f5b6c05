#!/usr/bin/env bash
# Kernel checks for a GPU machine, in one short run: the kernel tests (Triton compiled for the GPU
# against the reference) and the kernel benchmarks (block copies in GB/s beside index_select and clone;
# paged decode attention beside gather + SDPA), results in $OUT.
#
#   bash benches/gpu_check.sh --prepare   # here, with network: wheels the GPU image may lack -> out/gpu_wheels
#   OUT=/some/dir bash benches/gpu_check.sh   # there (device tool: carry out/gpu_wheels); --dry-run on a CPU
#
# The device image has torch, triton and pytest but no network and no kvcache install: kvcache is made
# importable from this checkout through a shadow package folder (kernels/ -> kvcache.kernels), and
# pytest-benchmark is installed from the prepared wheels when missing. Without CUDA the script still runs
# (the tests then use the Triton interpreter, the benchmark the reference): that is the dry run.
#
# Writes: $OUT/env.txt (device, versions), $OUT/tests.txt, $OUT/bench.txt, $OUT/bench_kernels.{txt,json,png},
# $OUT/status.txt (exit codes). Exits non-zero when the tests or the benchmark fail.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/out/gpu_wheels
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=$ROOT/.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps -d "$WHEELS" pytest-benchmark py-cpuinfo
    ls -l "$WHEELS"
    exit 0
fi
if [ "${1:-}" = "--dry-run" ] && [ -z "${OUT:-}" ]; then
    OUT=$ROOT/out/gpu_check_dry_run
fi
: "${OUT:?set OUT to the folder for results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Never import kvcache from the working directory (it lacks kvcache/kernels); only installed or shadowed.
export PYTHONSAFEPATH=1

if ! "$PY" -c "import kvcache.kernels" 2>/dev/null; then
    shadow=$(mktemp -d)
    mkdir "$shadow/kvcache"
    for entry in "$ROOT"/kvcache/*; do ln -s "$entry" "$shadow/kvcache/"; done
    ln -s "$ROOT/kernels" "$shadow/kvcache/kernels"
    export PYTHONPATH=$shadow${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" pytest-benchmark py-cpuinfo \
        || echo "pytest-benchmark is missing and $WHEELS has no wheel for it: run --prepare first"
fi

"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
else:
    print("device: no CUDA, dry run on", os.cpu_count(), "CPUs")
from kvcache.kernels.dispatch import select_backend
print("auto backend for cuda:0 ->", select_backend(torch.device("cuda", 0)))
EOF
cat "$OUT/env.txt"

timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_reference.py tests/test_kernels_checks.py \
    tests/test_kernels_triton.py tests/test_kernels_attention.py 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}

KVCACHE_BENCH_OUT=$OUT timeout 300 "$PY" -m pytest -q -p no:cacheprovider benches/bench_kernels.py \
    benches/bench_attention.py --benchmark-only --benchmark-columns=min,median,ops 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "tests_rc=$tests_rc bench_rc=$bench_rc" | tee "$OUT/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
