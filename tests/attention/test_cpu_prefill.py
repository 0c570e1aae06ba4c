"""The native prefill kernels (``cpu_prefill``): causal self-attention against float64 truth,
query chunks over rBlocks against the torch reference, and their place in the dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.attention.attn_helpers import HEAD_LAYOUTS, assert_close, randn, sdpa_truth

from infinite_llm.attention import cpu_prefill
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.cpu_prefill import (
    causal_self_attention_native,
    micro_attention_prefill_native,
)
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.reference import micro_attention_reference

pytestmark = pytest.mark.skipif(
    cpu_prefill.native_library() is None, reason="no C compiler for the native kernels"
)


def _fused(gen: torch.Generator, t: int, hq: int, hkv: int, d: int):
    """q, k, v as the model hands them over: views of one [T, Hq + 2 Hkv, D] projection."""
    qkv = randn(gen, t, hq + 2 * hkv, d)
    qkv[:, :hq] *= 2.0  # sharper softmax rows (exact: a power of two)
    return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from([*HEAD_LAYOUTS, (16, 2), (48, 1)]),
    d=st.sampled_from([16, 64, 128]),
    # lengths across the kernel's edges: one token, a 16-key panel, a 64-key softmax block
    query_lens=st.lists(
        st.one_of(st.integers(0, 20), st.sampled_from([63, 64, 65, 129]), st.integers(100, 300)),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**20),
)
def test_matches_truth(layout: tuple[int, int], d: int, query_lens: list[int], seed: int) -> None:
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    t = sum(query_lens)
    q, k, v = _fused(gen, t, hq, hkv, d)
    scale = d**-0.5
    got = causal_self_attention_native(q, k, v, query_lens, scale)
    assert got is not None
    out, lse = got
    row = 0
    for n in query_lens:
        ref_out, ref_lse = sdpa_truth(
            q[row : row + n], k[row : row + n], v[row : row + n], 0, scale
        )
        assert_close(out[row : row + n], lse[row : row + n], ref_out, ref_lse, torch.float32)
        row += n


def test_large_scores_stay_finite() -> None:
    """Scores far above exp's range (hundreds): the online softmax subtracts the running max
    first. float32 scores that large carry errors of their own, so the bound is torch's flash
    kernel's on the same input."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _fused(gen, 150, 9, 3, 64)
    q = q * 40.0
    out, lse = causal_self_attention_native(q, k, v, [70, 80], 0.125)  # type: ignore[misc]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    flash_out, _ = causal_self_attention(q, k, v, [70, 80], 0.125, torch.float32, "flash")
    ref_out, ref_lse = sdpa_truth(q[70:], k[70:], v[70:], 0, 0.125)
    err = (out[70:].double() - ref_out).abs().max().item()
    flash_err = (flash_out[70:].double() - ref_out).abs().max().item()
    assert err <= 2 * flash_err + 1e-6, (err, flash_err)
    assert (lse[70:].double() - ref_lse).abs().max().item() < 1e-3 * ref_lse.abs().max().item()


@pytest.mark.parametrize(
    "why",
    ["bfloat16", "head_dim_8", "head_dim_over_256", "lengths_do_not_add_up", "strided_heads"],
)
def test_declines_what_it_cannot_take(why: str) -> None:
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, lens = 4, 2, 64, [5, 7]
    if why == "head_dim_8":
        d = 8
    if why == "head_dim_over_256":
        d = 272
    q, k, v = _fused(gen, 12, hq, hkv, d)
    if why == "bfloat16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    if why == "lengths_do_not_add_up":
        lens = [5, 6]
    if why == "strided_heads":
        q = randn(gen, 12, d, hq).transpose(1, 2)  # heads not contiguous inside a token
    assert causal_self_attention_native(q, k, v, lens, d**-0.5) is None


def test_dispatch_takes_it_for_float32_cpu() -> None:
    """``causal_self_attention`` on float32 CPU tensors gives the native kernel's answer bit for
    bit (impl "auto" and "native"), and torch's flash kernel's under impl "flash"."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _fused(gen, 300, 9, 3, 64)
    lens, scale = [100, 200], 0.125
    native_out, native_lse = causal_self_attention_native(q, k, v, lens, scale)  # type: ignore[misc]
    for impl in ("auto", "native"):
        out, lse = causal_self_attention(q, k, v, lens, scale, torch.float32, impl)
        assert torch.equal(out, native_out) and torch.equal(lse, native_lse)
    flash_out, flash_lse = causal_self_attention(q, k, v, lens, scale, torch.float32, "flash")
    assert not torch.equal(flash_out, native_out)  # another summation order: another rounding
    assert_close(flash_out, flash_lse, native_out.double(), native_lse.double(), torch.float32)


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from([*HEAD_LAYOUTS, (16, 2)]),
    d=st.sampled_from([16, 64]),
    block_size=st.sampled_from([16, 5, 32]),
    requests=st.lists(
        st.tuples(st.integers(1, 70), st.integers(0, 150), st.integers(-40, 160)),
        min_size=1,
        max_size=4,
    ),
    causal=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_paged_matches_reference(
    layout: tuple[int, int],
    d: int,
    block_size: int,
    requests: list[tuple[int, int, int]],
    causal: bool,
    strided: bool,
    seed: int,
) -> None:
    """Query chunks over shuffled rBlocks of one pool layer (a view of a several-layer pool or
    not), every key visible or causal by position (offsets of either sign: a shard after the
    chunk's first tokens leaves rows that see nothing), against the torch reference."""
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    lens = [n for n, _, _ in requests]
    ctxs = [c for _, c, _ in requests]
    need = [-(-c // block_size) for c in ctxs]
    num_blocks = sum(need) + 3
    pool = randn(gen, 2, 2, hkv, num_blocks, block_size, d)  # [layer, k|v, ...]
    layer = 1 if strided else 0
    k_cache, v_cache = pool[layer, 0], pool[layer, 1]
    if not strided:
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_ids, used = [], 0
    for n in need:
        block_ids.append(order[used : used + n])
        used += n
    batch = MABatch(
        lens,
        block_ids,
        ctxs,
        block_size,
        q_start_pos=[max(0, off) + 200 for _, _, off in requests] if causal else None,
        kv_start_pos=[200 + max(0, -off) for _, _, off in requests] if causal else None,
    )
    q = randn(gen, sum(lens), hq, d, std=2.0)
    got = micro_attention_prefill_native(q, k_cache, v_cache, batch, d**-0.5, causal)
    assert got is not None
    ref_out, ref_lse = micro_attention_reference(q, k_cache, v_cache, batch, d**-0.5, causal)
    assert_close(got[0], got[1], ref_out.double(), ref_lse.double(), torch.float32)


def test_micro_attention_auto_takes_paged_chunks() -> None:
    """``micro_attention`` (impl "auto") gives the native prefill kernel's answer for query
    chunks bit for bit, alone and beside decode rows."""
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d, bs = 9, 3, 64, 16
    k_cache, v_cache = randn(gen, hkv, 40, bs, d), randn(gen, hkv, 40, bs, d)
    chunks = MABatch([30, 20], [[3, 9, 1], [7, 2, 30, 31]], [40, 64], bs)
    q = randn(gen, 50, hq, d)
    want = micro_attention_prefill_native(q, k_cache, v_cache, chunks, 0.125)
    got = micro_attention(q, k_cache, v_cache, chunks, 0.125)
    assert want is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    mixed = MABatch([1, 30, 2], [[5], [3, 9, 1], [12, 13]], [9, 40, 20], bs)
    q = randn(gen, 33, hq, d)
    out, lse = micro_attention(q, k_cache, v_cache, mixed, 0.125)
    part = mixed.split_by_query_len(8)[1]
    assert part is not None
    want = micro_attention_prefill_native(q[part.rows], k_cache, v_cache, part.batch, 0.125)
    assert want is not None
    assert torch.equal(out[part.rows], want[0]) and torch.equal(lse[part.rows], want[1])
