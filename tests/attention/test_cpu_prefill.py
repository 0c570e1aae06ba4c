"""The native causal self-attention of a prefill step (``cpu_prefill``) against float64 truth,
and its place in ``causal_self_attention``'s dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.attention.attn_helpers import HEAD_LAYOUTS, assert_close, randn, sdpa_truth

from infinite_llm.attention import cpu_prefill
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.cpu_prefill import causal_self_attention_native

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
