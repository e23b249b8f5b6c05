"""Properties of the block copies for any pool shape, dtype and id list (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_support import DEVICE, DTYPES, make_pool, naive_pack, triton_module

from kvcache.kernels.dispatch import pack_blocks, unpack_blocks


@st.composite
def pool_and_ids(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    shape = (
        draw(st.integers(1, 3)),  # num_layers
        draw(st.integers(1, 8)),  # num_blocks
        draw(st.integers(1, 5)),  # block_size
        draw(st.integers(1, 3)),  # kv_heads
        draw(st.integers(1, 9)),  # head_dim
    )
    dtype = draw(st.sampled_from(DTYPES))
    ids = draw(st.permutations(range(shape[1])))[: draw(st.integers(0, shape[1]))]
    return make_pool(shape, dtype, seed=draw(st.integers(0, 2**16))), list(ids)


@settings(max_examples=60, deadline=None)
@given(pool_and_ids())
def test_reference_round_trips_and_matches_loops(case: tuple[torch.Tensor, list[int]]) -> None:
    pool, ids = case
    index = torch.tensor(ids, dtype=torch.int64)
    packed = pack_blocks(pool, index, backend="reference")
    assert torch.equal(packed.cpu(), naive_pack(pool, ids))

    # Writing what was read changes nothing; writing it elsewhere reproduces it there.
    before = pool.clone()
    unpack_blocks(pool, index, packed, backend="reference")
    assert torch.equal(pool, before)
    fresh = torch.zeros_like(pool)
    unpack_blocks(fresh, index, packed, backend="reference")
    assert torch.equal(pack_blocks(fresh, index, backend="reference"), packed)


@settings(max_examples=8, deadline=None)
@given(pool_and_ids())
def test_triton_equals_reference(case: tuple[torch.Tensor, list[int]]) -> None:
    pytest.importorskip("triton")
    tk = triton_module()
    pool, ids = case
    index = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    packed = pack_blocks(pool, index, backend="reference")
    assert torch.equal(tk.pack_blocks(pool, index), packed)
    packed = torch.randn_like(packed)
    ours, theirs = pool.clone(), pool.clone()
    tk.unpack_blocks(ours, index, packed)
    unpack_blocks(theirs, index, packed, backend="reference")
    assert torch.equal(ours, theirs)
