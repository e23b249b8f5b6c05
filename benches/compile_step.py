"""One decode step of a registry model at batch 1, eager against ``torch.compile``, side by side.

    .venv/bin/python benches/compile_step.py [--model smollm2-135m] [--rounds 5] [--steps 12]

transformers' own forward over a ``StaticCache`` (fixed shapes, so the compiled graph is reused
every step): a 128-token prompt, then ``--steps`` decode steps timed one by one, eager and compiled
alternating for ``--rounds`` rounds in one process, torch on one thread. Prints the compile time
(the first compiled steps), each round's medians and their ratio, the median ratio, and the load
average. CPU inductor needs a C compiler.

Not here: the engine's paged step (``bench_engine.py``, part ``step``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StaticCache

from kvcache.model import registry


def decode_times(model: Any, forward: Callable[..., Any], steps: int, prompt_len: int = 128) -> list[float]:
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=prompt_len + steps + 1)
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(prompt_len))
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(steps):
            started = time.perf_counter()
            out = forward(
                input_ids=token, past_key_values=cache, cache_position=torch.tensor([prompt_len + i])
            )
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = registry.load(args.model, device="cpu", dtype=torch.float32, show_progress=False).model
    model.eval()
    started = time.perf_counter()
    compiled = torch.compile(model.forward, dynamic=False)
    decode_times(model, compiled, 3)
    print(f"compile and first steps: {time.perf_counter() - started:.1f} s", flush=True)
    ratios = []
    for r in range(args.rounds):
        eager = statistics.median(decode_times(model, model.forward, args.steps))
        comp = statistics.median(decode_times(model, compiled, args.steps))
        ratios.append(comp / eager)
        print(
            f"round {r}: eager {eager * 1e3:.1f} ms, compiled {comp * 1e3:.1f} ms, ratio {comp / eager:.2f}"
        )
    load = os.getloadavg()
    print(
        f"median compiled / eager {statistics.median(ratios):.2f} over {args.rounds} rounds "
        f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )


if __name__ == "__main__":
    main()
