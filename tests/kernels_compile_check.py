"""Compile every Triton kernel variant the launchers use for sm_90, down to a cubin (no GPU needed).

Run as a script in a fresh process by ``test_kernels_compile.py``: a process that switched on the
Triton interpreter cannot compile. Prints one line per compiled kernel: its name and cubin size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvcache.kernels import triton_attention, triton_kernels

TARGET = GPUTarget("cuda", 90, 32)


def build(fn: Any, types: Callable[[str], str], constexprs: dict[str, Any]) -> int:
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types(n) for n in names}
    fixed = {(names.index(k),): v for k, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=fixed), target=TARGET)
    return len(kernel.asm["cubin"])


def copy_types(dtype: str, stride: str) -> Callable[[str], str]:
    def types(name: str) -> str:
        if name in ("src_ptr", "dst_ptr"):
            return f"*{dtype}"
        return "*i64" if name.endswith("ids_ptr") else stride

    return types


def attention_types(dtype: str) -> Callable[[str], str]:
    def types(name: str) -> str:
        if name in ("q_ptr", "out_ptr", "k_base_ptr", "v_base_ptr"):
            return f"*{dtype}"
        if name in ("tables_ptr", "lens_ptr"):
            return "*i64"
        if name.startswith("part_"):
            return "*fp32"
        return "fp32" if name == "scale" else "i32"

    return types


def main() -> None:
    p2 = triton.next_power_of_2
    # (src indexed, dst indexed, dtype, stride type, block_size, kv_heads, head_dim)
    copies = [
        (True, False, "bf16", "i32", 16, 4, 128),  # pack_blocks
        (False, True, "fp16", "i32", 16, 2, 64),  # unpack_blocks
        (True, False, "fp32", "i64", 3, 5, 12),  # pack_blocks from a pool whose strides pass 2**31
    ]
    for src_ix, dst_ix, dtype, stride, bs, heads, dim in copies:
        constexprs = {
            "SRC_INDEXED": src_ix,
            "DST_INDEXED": dst_ix,
            "BLOCK_SIZE": bs,
            "KV_HEADS": heads,
            "HEAD_DIM": dim,
            "TILE": min(p2(bs * heads * dim), 4096),
        }
        size = build(triton_kernels._block_copy_kernel, copy_types(dtype, stride), constexprs)
        print("block_copy", src_ix, dst_ix, dtype, size)
    for group, bs, dim, dtype, split in (
        (7, 16, 128, "bf16", False),
        (7, 16, 128, "bf16", True),
        (1, 3, 12, "fp32", True),
    ):
        constexprs = {
            "GROUP": group,
            "GROUP_P2": p2(group),
            "BLOCK_SIZE": bs,
            "BLOCK_SIZE_P2": p2(bs),
            "HEAD_DIM": dim,
            "HEAD_DIM_P2": p2(dim),
            "SPLIT": split,
        }
        size = build(triton_attention._paged_decode_kernel, attention_types(dtype), constexprs)
        print("paged_decode", group, dtype, split, size)


if __name__ == "__main__":
    main()
