"""The Triton decode-attention kernel (``paged_attention``'s decode rows on CUDA) against torch's SDPA
over each sequence's gathered blocks, split or not, and its argument checks.

Without CUDA the kernel runs in the interpreter on CPU tensors (see test_kernels_triton.py);
test_kernels_paged.py checks it inside ``paged_attention`` against the paged reference.
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from kernels_support import DEVICE, make_pool, triton_module

from kvcache.errors import KernelError

# (num_layers, num_blocks, block_size, kv_heads, head_dim, num_heads): plain MHA, GQA of 4, a group
# of 7 with odd block size and head_dim (every tile masked). The interpreter runs a reduce step by
# step in Python: small heads and blocks keep the cases fast.
TRITON_CASES = ((2, 10, 4, 2, 8, 2), (1, 12, 8, 2, 16, 8), (2, 9, 3, 1, 12, 7))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def decode_batch(
    case: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, pool, block tables padded with -1 past each length, lengths (1 token, partial, full)."""
    num_layers, num_blocks, block_size, kv_heads, head_dim, num_heads = case
    pool = make_pool((num_layers, num_blocks, block_size, kv_heads, head_dim), dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(3, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    max_blocks = 3
    lens = torch.tensor([1, 2 * block_size - 1, max_blocks * block_size])
    tables = torch.full((3, max_blocks), -1, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen)
    for s, n in enumerate(lens.tolist()):
        used = -(-n // block_size)
        tables[s, :used] = order[s * max_blocks : s * max_blocks + used].to(torch.int32)
    return q, pool, tables, lens


def sdpa(
    q: torch.Tensor, pool: torch.Tensor, layer: int, tables: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each sequence's blocks gathered, softmax attention in float32, the result in ``q``'s dtype."""
    _, _, _, block_size, kv_heads, head_dim = pool.shape
    group = q.shape[1] // kv_heads
    rows = []
    for s, n in enumerate(lens.tolist()):
        ids = tables[s, : -(-n // block_size)].long().to(pool.device)
        k = pool[layer, 0, ids].reshape(-1, kv_heads, head_dim)[:n].float()
        v = pool[layer, 1, ids].reshape(-1, kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, T, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        rows.append(F.scaled_dot_product_attention(q[s].float()[:, None, :], k, v, scale=scale)[:, 0])
    return torch.stack(rows).to(q.dtype)


@pytest.fixture(scope="module")
def ta() -> ModuleType:
    pytest.importorskip("triton")
    return triton_module("triton_attention")


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_sdpa(ta: ModuleType, case: tuple[int, ...], dtype: torch.dtype) -> None:
    q, pool, tables, lens = decode_batch(case, dtype, seed=3)
    layer = case[0] - 1
    scale = 1.0 / math.sqrt(case[4])
    ours = ta.paged_decode_attention(q, pool, layer, tables, lens, scale)
    theirs = sdpa(q, pool, layer, tables, lens, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    # one token: softmax over one score is exactly 1, so the output is that token's V bit for bit
    value = pool[layer, 1, int(tables[0, 0]), 0].repeat_interleave(case[5] // case[3], dim=0)
    assert torch.equal(ours[0], value)


@pytest.mark.parametrize(
    ("case", "num_splits"),
    [(TRITON_CASES[0], 2), (TRITON_CASES[0], 3), (TRITON_CASES[1], 2), (TRITON_CASES[2], 5)],
)
def test_split_kv_merges_to_sdpa(ta: ModuleType, case: tuple[int, ...], num_splits: int) -> None:
    # Tables hold 3 blocks: 2 splits leave the 1-token sequence's second split empty, 5 become 3.
    q, pool, tables, lens = decode_batch(case, torch.float32, seed=7)
    scale = 1.0 / math.sqrt(case[4])
    ours = ta.paged_decode_attention(q, pool, 0, tables, lens, scale, num_splits=num_splits)
    theirs = sdpa(q, pool, 0, tables, lens, scale)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bad_split_count_is_named(ta: ModuleType) -> None:
    q, pool, tables, lens = decode_batch(TRITON_CASES[0], torch.float32)
    with pytest.raises(KernelError, match="num_splits=0 must be a positive int"):
        ta.paged_decode_attention(q, pool, 0, tables, lens, 1.0, num_splits=0)


def test_a_custom_scale(ta: ModuleType) -> None:
    q, pool, tables, lens = decode_batch(TRITON_CASES[0], torch.float32, seed=5)
    ours = ta.paged_decode_attention(q, pool, 1, tables, lens, 0.5)
    torch.testing.assert_close(ours, sdpa(q, pool, 1, tables, lens, 0.5), atol=1e-5, rtol=1e-5)


BAD = {
    "pool not a tensor": (lambda q, p, t, n: (q, "pool", 0, t, n), "pool must be a torch.Tensor, got str"),
    "q of another head_dim": (lambda q, p, t, n: (q[..., :4], p, 0, t, n), "head_dim 8"),
    "heads not a multiple": (
        lambda q, p, t, n: (q[:, :1].expand(3, 3, 8), p, 0, t, n),
        "multiple of 2 heads",
    ),
    "layer past the pool": (lambda q, p, t, n: (q, p, 2, t, n), "layer=2 is not a layer of the pool's 2"),
    "empty sequence": (
        lambda q, p, t, n: (q, p, 0, t, torch.tensor([0, 1, 1])),
        "seq_lens must lie in [1, 12]",
    ),
    "too long a sequence": (lambda q, p, t, n: (q, p, 0, t, torch.tensor([13, 1, 1])), "got 1..13"),
    "table entry past the pool": (
        lambda q, p, t, n: (q, p, 0, torch.where(t == t[2, 2], 10, t), n),
        "block_tables row 2 lists a block outside the pool's 10 blocks",
    ),
    "float tables": (lambda q, p, t, n: (q, p, 0, t.float(), n), "block_tables has dtype torch.float32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_decode_arguments_are_named(ta: ModuleType, case: str) -> None:
    q, pool, tables, lens = decode_batch(TRITON_CASES[0], torch.float32)
    make, message = BAD[case]
    with pytest.raises(KernelError) as err:
        ta.paged_decode_attention(*make(q, pool, tables, lens), 1.0)
    assert message in str(err.value)
