"""DistAttention (DistPlan + LocalExecutor + merge) equals monolithic causal SDPA on any placement."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from attn_helpers import (
    HEAD_DIMS,
    HEAD_LAYOUTS,
    assert_close,
    impls,
    place,
    randn,
    read_tokens,
    sdpa_truth,
    write_tokens,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention import cpu_native
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.dist import DistAttention, LocalExecutor
from infinite_llm.attention.plan import DistPlan, StepSpan

LAYER = 1  # of two: the layer index must reach the pools


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(HEAD_LAYOUTS),
    d=st.sampled_from(HEAD_DIMS),
    bs=st.sampled_from([1, 4, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    impl=st.sampled_from(impls()),
    num_pools=st.integers(1, 8),
    # (tokens already cached, tokens computed this step): decode, first prefill chunk, later chunks
    reqs=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 20)), min_size=1, max_size=4),
    spare_blocks=st.integers(0, 2),
    seed=st.integers(0, 2**20),
)
def test_dist_attention_matches_sdpa(
    layout: tuple[int, int],
    d: int,
    bs: int,
    dtype: torch.dtype,
    impl: str,
    num_pools: int,
    reqs: list[tuple[int, int]],
    spare_blocks: int,
    seed: int,
) -> None:
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = [-(-(c + n) // bs) + spare_blocks for c, n in reqs]
    placement = place(rng, num_pools, num_blocks, bs, hkv, d, dtype, num_layers=2)
    full_k = [randn(gen, c + n, hkv, d, dtype=dtype) for c, n in reqs]
    full_v = [randn(gen, c + n, hkv, d, dtype=dtype) for c, n in reqs]
    for i, (c, _) in enumerate(reqs):
        write_tokens(placement, LAYER, i, 0, full_k[i][:c], full_v[i][:c])
    spans = [StepSpan(placement.refs[i], c, n) for i, (c, n) in enumerate(reqs)]
    plan = DistPlan(spans, bs)
    scale = d**-0.5
    attention = DistAttention(LocalExecutor(placement.pools, impl=impl), plan, scale)
    q = randn(gen, plan.num_tokens, hq, d, dtype=dtype, std=2.0)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, reqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, reqs)])
    out = attention(LAYER, q.to(dtype), new_k.to(dtype), new_v.to(dtype))
    assert out.dtype == dtype and out.shape == q.shape
    row = 0
    for i, (c, n) in enumerate(reqs):
        ref_out, _ = sdpa_truth(q[row : row + n], full_k[i], full_v[i], c, scale)
        assert_close(out[row : row + n], None, ref_out, None, dtype)
        row += n
    # the step's new tokens were stored in their rBlocks, wherever those live
    for i, (c, n) in enumerate(reqs):
        k, v = read_tokens(placement, LAYER, i, c + n)
        assert torch.equal(k, full_k[i]) and torch.equal(v, full_v[i])


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(HEAD_LAYOUTS),
    d=st.sampled_from(HEAD_DIMS),
    bs=st.sampled_from([1, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    num_pools=st.integers(2, 8),
    contexts=st.lists(st.integers(0, 700), min_size=1, max_size=5),
    seed=st.integers(0, 2**20),
)
def test_decode_over_pools_in_one_native_call(
    layout: tuple[int, int],
    d: int,
    bs: int,
    dtype: torch.dtype,
    num_pools: int,
    contexts: list[int],
    seed: int,
) -> None:
    """A decode batch spread over pools: the in-process executor runs every pool's MA and the
    merge in one native call (where the kernel takes the tensors); same result as SDPA."""
    hq, hkv = layout
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    placement = place(
        rng, num_pools, [c // bs + 1 for c in contexts], bs, hkv, d, dtype, num_layers=2
    )
    full_k = [randn(gen, c + 1, hkv, d, dtype=dtype) for c in contexts]
    full_v = [randn(gen, c + 1, hkv, d, dtype=dtype) for c in contexts]
    for i, c in enumerate(contexts):
        write_tokens(placement, LAYER, i, 0, full_k[i][:c], full_v[i][:c])
    plan = DistPlan([StepSpan(placement.refs[i], c, 1) for i, c in enumerate(contexts)], bs)
    executor = LocalExecutor(placement.pools)
    attention = DistAttention(executor, plan, d**-0.5)
    q = randn(gen, len(contexts), hq, d, dtype=dtype, std=2.0)
    new_k = torch.cat([k[c:] for k, c in zip(full_k, contexts)])
    new_v = torch.cat([v[c:] for v, c in zip(full_v, contexts)])
    out = attention(LAYER, q.to(dtype), new_k.to(dtype), new_v.to(dtype))  # the model's dtype
    for i, c in enumerate(contexts):
        ref_out, _ = sdpa_truth(q[i : i + 1], full_k[i], full_v[i], c, d**-0.5)
        assert_close(out[i : i + 1], None, ref_out, None, dtype)
    fusable = cpu_native.native_available() and d % (8 if dtype == torch.float32 else 16) == 0
    assert executor.num_fused_calls == int(fusable and len(plan.shards) > 1)


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(HEAD_LAYOUTS),
    d=st.sampled_from([16, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    query_lens=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    strided=st.booleans(),
    path=st.sampled_from(["decode", "decode-torch", "prefill"]),
    seed=st.integers(0, 2**20),
)
def test_causal_self_attention_matches_sdpa(
    layout: tuple[int, int],
    d: int,
    dtype: torch.dtype,
    query_lens: list[int],
    strided: bool,
    path: str,
    seed: int,
) -> None:
    """The step's own tokens (decode: each sees only itself; native or torch), from strided views too."""
    hq, hkv = layout
    if path.startswith("decode"):
        query_lens = [1] * len(query_lens)
    gen = torch.Generator().manual_seed(seed)
    t = sum(query_lens)
    q = randn(gen, t, hq, d, dtype=dtype, std=2.0)
    kv = randn(gen, t, 3 * hkv, d, dtype=dtype)  # a fused projection: k, v are strided views
    k, v = (
        (kv[:, :hkv], kv[:, hkv : 2 * hkv])
        if strided
        else (kv[:, :hkv].clone(), kv[:, hkv : 2 * hkv].clone())
    )
    scale = d**-0.5
    with _native_disabled(path == "decode-torch"):
        out, lse = causal_self_attention(q.to(dtype), k.to(dtype), v.to(dtype), query_lens, scale)
    row = 0
    for n in query_lens:
        ref_out, ref_lse = sdpa_truth(
            q[row : row + n], k[row : row + n], v[row : row + n], 0, scale
        )
        assert_close(out[row : row + n], lse[row : row + n], ref_out, ref_lse, dtype)
        row += n


@contextlib.contextmanager
def _native_disabled(disabled: bool) -> Iterator[None]:
    saved = dict(cpu_native._state)
    if disabled:
        cpu_native._state["lib"] = None
    try:
        yield
    finally:
        cpu_native._state.clear()
        cpu_native._state.update(saved)
