"""The Triton kernels compile for a Hopper GPU (sm_90) down to a cubin, without a GPU.

The interpreter checks what the kernels compute; this checks that Triton's compiler accepts them
for the device they are written for, in the constexpr variants the launchers use. Triton ships
ptxas, so the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin) runs on a CPU machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvcache.child import python_argv


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: every kernel really compiles
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("kernels_compile_check.py")
    result = subprocess.run(
        [*python_argv(), str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = [line.split()[0] for line in result.stdout.splitlines()]
    assert kernels == ["block_copy"] * 3 + ["paged_decode"] * 3
    assert all(int(line.split()[-1]) > 1000 for line in result.stdout.splitlines())  # real cubins
