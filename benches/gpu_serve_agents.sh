#!/usr/bin/env bash
# GPU variant of benches/bench_serve_agents.py: persistent-context agents served at 7B scale. A
# random-weight model with Qwen2.5-7B's shape in bf16 (about 15 GB; no download) is written once as a
# checkpoint folder (SmolLM2's tokenizer: its ids fit Qwen2.5's vocabulary), then `kvcache serve`
# (sharing on, sharing impossible) and `transformers serve --continuous-batching` load that folder on
# the GPU and run the long shape, then the short one, through the openai client.
#
#   bash benches/gpu_serve_agents.sh --prepare       # here, with a package index: -> out/gpu_serve
#   OUT=/some/dir bash benches/gpu_serve_agents.sh   # there (device tool: carry out/gpu_serve)
#
# The device image has torch, transformers and numpy but neither network nor kvcache's serving
# dependencies: --prepare downloads their wheels (no torch, no transformers), copies redis-server and
# the tokenizer files; the run installs the wheels offline, makes kvcache importable from this
# checkout, writes the folder under $OUT/.. (not carried back) and runs the bench. Override with
# SERVE_AGENTS_ROUNDS (2), SERVE_AGENTS_SHAPE (long), SERVE_AGENTS_QUICK (empty; 1 for --quick),
# SERVE_AGENTS_CONTENDERS (all three). transformers serve's KV cache gets the same capacity as
# kvcache's pool (not 90% of the free GPU memory), so the three servers fit on one 80 GB card.
# Writes: $OUT/env.txt, $OUT/bench.txt, $OUT/serve_agents.json, $OUT/logs/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PREP=$ROOT/out/gpu_serve
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=$ROOT/.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$PREP/wheels" "$PREP/tokenizer" "$PREP/bin"
    # GPU_PYTHON_VERSION=3.12 (say): wheels for the device image's Python when it differs from this one.
    "$PY" -m pip download --quiet -d "$PREP/wheels" --only-binary=:all: \
        ${GPU_PYTHON_VERSION:+--python-version "$GPU_PYTHON_VERSION"} \
        openai aiohttp redis prometheus-client xxhash blake3 msgspec pyzmq cbor2 tqdm \
        fastapi uvicorn "pydantic>=2" opentelemetry-api
    # torch and transformers come with the image; never replace them.
    rm -f "$PREP"/wheels/torch-* "$PREP"/wheels/transformers-* "$PREP"/wheels/nvidia_* "$PREP"/wheels/triton-*
    "$PY" -P -c "from kvcache import models; print(models.prepare('smollm2-135m'))" >"$PREP/folder.txt"
    cp "$(cat "$PREP/folder.txt")"/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$PREP/tokenizer/" \
        2>/dev/null || cp "$(cat "$PREP/folder.txt")"/tokenizer* "$PREP/tokenizer/"
    cp "$(command -v redis-server)" "$PREP/bin/" || echo "no redis-server here: install it (apt) and rerun"
    du -sh "$PREP"
    exit 0
fi
: "${OUT:?set OUT to the folder for results}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 PATH=$PREP/bin:$PATH
"$PY" -m pip install --quiet --no-index --find-links "$PREP/wheels" openai aiohttp redis prometheus-client \
    xxhash blake3 msgspec pyzmq cbor2 tqdm fastapi uvicorn opentelemetry-api 2>&1 | tail -3
if ! "$PY" -P -c "import kvcache.kernels" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -P -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

FOLDER=${SERVE_AGENTS_FOLDER:-$ROOT/out/qwen2.5-7b-shape}
if [ ! -f "$FOLDER/config.json" ]; then
    "$PY" -P - "$FOLDER" "$PREP/tokenizer" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from kvcache import hf
folder, tokenizer = Path(sys.argv[1]), Path(sys.argv[2])
loaded = hf.load_model("qwen2.5-7b-shape", device="cuda", dtype=torch.bfloat16, seed=0)
loaded.model.save_pretrained(folder)
for f in tokenizer.iterdir():
    shutil.copy(f, folder / f.name)
print("wrote", folder)
EOF
fi
QUICK=${SERVE_AGENTS_QUICK:+--quick}
"$PY" -P benches/bench_serve_agents.py --model "$FOLDER" --device cuda --dtype bfloat16 --threads "$(nproc)" \
    --shape "${SERVE_AGENTS_SHAPE:-long}" $QUICK --rounds "${SERVE_AGENTS_ROUNDS:-2}" \
    --contenders "${SERVE_AGENTS_CONTENDERS:-sharing,no-sharing,transformers}" \
    --logs "$OUT/logs" --out "$OUT/serve_agents.json" \
    2>&1 | tee "$OUT/bench.txt"
exit "${PIPESTATUS[0]}"
