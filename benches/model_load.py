"""How long a registry model takes to become usable: first use (conversion) and later loads.

    .venv/bin/python benches/model_load.py                 # later loads only, median of 5
    .venv/bin/python benches/model_load.py --convert       # also a first use into a fresh folder
    .venv/bin/python benches/model_load.py --cold          # the checkpoint out of the page cache

Each measurement runs in a fresh Python process, as a user's command would. ``--cold`` first drops
the converted folder's files from the page cache (``posix_fadvise(DONTNEED)``, no root needed), so
every run reads the checkpoint from disk, as after a reboot or on a fresh machine. It prints per run the
seconds of ``kvcache.model.registry.load`` (manifest and digest check, weights, tokenizer; the first call
in a process also pays transformers' lazy imports of its model-loading code), of a second call in
the same process (the checkpoint alone), and of the whole process, their medians, and the
machine's load average. The target for a later load is <= 3 s of ``models.load``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kvcache.child import python_argv
from kvcache.model import registry as models

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from kvcache.model import registry as models
t1 = time.perf_counter()
loaded = models.load(sys.argv[1], device="cpu", dtype=torch.float32, show_progress=False)
t2 = time.perf_counter()
again = models.load(sys.argv[1], device="cpu", dtype=torch.float32, show_progress=False)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "reload_s": t3 - t2}))
"""


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of every file in ``folder`` (clean pages only:
    the files were written long ago), so the next read comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_once(name: str, env: dict[str, str], cold: bool = False) -> dict[str, float]:
    if cold:  # a registry model's folder, under the children's KVCACHE_HOME, or a local folder
        drop_from_page_cache(models.checkpoint_dir(name) if name in models.REGISTRY else Path(name))
    start = time.perf_counter()
    out = subprocess.run(
        [*python_argv(), "-c", _CHILD, name], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--convert", action="store_true", help="first time a first use in a fresh folder")
    parser.add_argument("--cold", action="store_true", help="read the checkpoint from disk in every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvcache-load-") as tmp:
        if args.convert:
            os.environ["KVCACHE_HOME"] = tmp  # for the children, and for checkpoint_dir here
        env = dict(os.environ)
        if args.convert:
            first = run_once(args.model, env)
            print(
                f"first use (conversion): models.load {first['load_s']:.2f} s, "
                f"process {first['process_s']:.2f} s"
            )
        else:
            run_once(args.model, env)  # make sure it is converted; not counted
        runs = [run_once(args.model, env, args.cold) for _ in range(args.runs)]
    for i, r in enumerate(runs):
        print(
            f"run {i}: models.load {r['load_s']:.2f} s, again {r['reload_s']:.2f} s, "
            f"imports {r['imports_s']:.2f} s, "
            f"process {r['process_s']:.2f} s"
        )
    load = os.getloadavg()
    which = "later load (cold page cache)" if args.cold else "later load"
    print(
        f"{args.model} {which}: models.load median {statistics.median(r['load_s'] for r in runs):.2f} s, "
        f"again in-process {statistics.median(r['reload_s'] for r in runs):.2f} s, "
        f"whole process median {statistics.median(r['process_s'] for r in runs):.2f} s "
        f"(median of {args.runs}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; target <= 3 s)"
    )


if __name__ == "__main__":
    main()
