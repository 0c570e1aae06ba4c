"""Every MicroAttention kernel, alone and merged over shards, equals monolithic SDPA."""

from __future__ import annotations

import itertools
import random

import torch
from attn_helpers import (
    HEAD_DIMS,
    HEAD_LAYOUTS,
    assert_close,
    impls,
    place,
    randn,
    sdpa_truth,
    write_tokens,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.merge import merge_attention_states
from infinite_llm.attention.micro import micro_attention

DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def shapes(draw: st.DrawFn) -> dict:
    hq, hkv = draw(st.sampled_from(HEAD_LAYOUTS))
    return {
        "hq": hq,
        "hkv": hkv,
        "d": draw(st.sampled_from(HEAD_DIMS)),
        "bs": draw(st.sampled_from([1, 3, 4, 16, 32])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**20)),
    }


def _requests(
    gen: torch.Generator, s: dict, ctxs: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            randn(gen, c, s["hkv"], s["d"], dtype=s["dtype"]),
            randn(gen, c, s["hkv"], s["d"], dtype=s["dtype"]),
        )
        for c in ctxs
    ]


@settings(max_examples=40, deadline=None)
@given(
    s=shapes(),
    impl=st.sampled_from(impls()),
    reqs=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 12)), min_size=1, max_size=4),
)
def test_one_pool_every_impl_matches_sdpa(s: dict, impl: str, reqs: list[tuple[int, int]]) -> None:
    """A batch of requests (some with no context, some with no query) in one pool."""
    gen = torch.Generator().manual_seed(s["seed"])
    ctxs, qlens = [c for c, _ in reqs], [n for _, n in reqs]
    bs = s["bs"]
    placement = place(
        random.Random(s["seed"]), 1, [-(-c // bs) for c in ctxs], bs, s["hkv"], s["d"], s["dtype"]
    )
    kv = _requests(gen, s, ctxs)
    for i, (k, v) in enumerate(kv):
        write_tokens(placement, 0, i, 0, k, v)
    batch = MABatch(qlens, [[r.block_id for r in refs] for refs in placement.refs], ctxs, bs)
    q = randn(gen, sum(qlens), s["hq"], s["d"], dtype=s["dtype"], std=2.0)
    scale = s["d"] ** -0.5
    pool = placement.pools[0]
    out, lse = micro_attention(q.to(s["dtype"]), pool.k[0], pool.v[0], batch, scale, impl=impl)
    assert out.dtype == s["dtype"] and out.shape == q.shape
    for i, (k, v) in enumerate(kv):
        r0, r1 = batch.query_start[i], batch.query_start[i + 1]
        ref_out, ref_lse = sdpa_truth(q[r0:r1], k, v, None, scale)
        assert_close(out[r0:r1], lse[r0:r1], ref_out, ref_lse, s["dtype"])


@settings(max_examples=40, deadline=None)
@given(
    s=shapes(),
    impl=st.sampled_from(impls()),
    ctxs=st.lists(st.integers(1, 400), min_size=1, max_size=3),
    num_pools=st.integers(1, 8),
    decode=st.booleans(),
)
def test_random_shards_merge_to_sdpa(
    s: dict, impl: str, ctxs: list[int], num_pools: int, decode: bool
) -> None:
    """rBlocks scattered over pools; one MA per pool (empty shards too) merged == monolithic."""
    gen = torch.Generator().manual_seed(s["seed"])
    rng = random.Random(s["seed"])
    bs = s["bs"]
    num_blocks = [-(-c // bs) for c in ctxs]
    placement = place(rng, num_pools, num_blocks, bs, s["hkv"], s["d"], s["dtype"])
    kv = _requests(gen, s, ctxs)
    for i, (k, v) in enumerate(kv):
        write_tokens(placement, 0, i, 0, k, v)
    qlens = [1 if decode else rng.randint(1, 6) for _ in ctxs]
    q = randn(gen, sum(qlens), s["hq"], s["d"], dtype=s["dtype"], std=2.0)
    scale = s["d"] ** -0.5
    outs, lses = [], []
    for p, pool in placement.pools.items():
        blocks, tokens = [], []
        for i, refs in enumerate(placement.refs):
            mine = [j for j, r in enumerate(refs) if r.instance_id == p]
            blocks.append([refs[j].block_id for j in mine])
            # only the logically last block may be partial, and it comes last here too
            partial = num_blocks[i] * bs - ctxs[i] if mine and mine[-1] == num_blocks[i] - 1 else 0
            tokens.append(len(mine) * bs - partial)
        batch = MABatch(qlens, blocks, tokens, bs)
        out, lse = micro_attention(q.to(s["dtype"]), pool.k[0], pool.v[0], batch, scale, impl=impl)
        outs.append(out)
        lses.append(lse)
    order = list(range(len(outs)))
    rng.shuffle(order)  # merging is order-free
    out, lse = merge_attention_states([outs[j] for j in order], [lses[j] for j in order])
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    for i, (k, v) in enumerate(kv):
        ref_out, ref_lse = sdpa_truth(q[starts[i] : starts[i + 1]], k, v, None, scale)
        assert_close(
            out[starts[i] : starts[i + 1]],
            lse[starts[i] : starts[i + 1]],
            ref_out,
            ref_lse,
            s["dtype"],
        )


@settings(max_examples=40, deadline=None)
@given(
    s=shapes(),
    impl=st.sampled_from(impls()),
    seq_len=st.integers(1, 300),
    num_new=st.integers(1, 24),
    cuts=st.lists(st.integers(0, 40), max_size=7),
)
def test_causal_contiguous_shards_merge_to_sdpa(
    s: dict, impl: str, seq_len: int, num_new: int, cuts: list[int]
) -> None:
    """The last ``num_new`` tokens attend causally to the whole sequence, cut into contiguous
    shards (one per pool, some empty, some wholly in the future of early query rows)."""
    num_new = min(num_new, seq_len)
    gen = torch.Generator().manual_seed(s["seed"])
    bs = s["bs"]
    num_blocks = -(-seq_len // bs)
    bounds = sorted({0, num_blocks, *(min(c, num_blocks) for c in cuts)})
    shard_blocks = [*itertools.pairwise(bounds), (num_blocks, num_blocks)]  # and an empty shard
    k, v = _requests(gen, s, [seq_len])[0]
    q = randn(gen, num_new, s["hq"], s["d"], dtype=s["dtype"], std=2.0)
    q_pos0 = seq_len - num_new
    scale = s["d"] ** -0.5
    outs, lses = [], []
    for a, b in shard_blocks:
        first, last = min(a * bs, seq_len), min(b * bs, seq_len)
        pool = place(
            random.Random(s["seed"] + a), 1, [max(b - a, 1)], bs, s["hkv"], s["d"], s["dtype"]
        )
        if last > first:
            write_tokens(pool, 0, 0, 0, k[first:last], v[first:last])
        ids = [r.block_id for r in pool.refs[0]][: b - a]
        batch = MABatch(
            [num_new], [ids], [last - first], bs, q_start_pos=[q_pos0], kv_start_pos=[first]
        )
        out, lse = micro_attention(
            q.to(s["dtype"]),
            pool.pools[0].k[0],
            pool.pools[0].v[0],
            batch,
            scale,
            causal=True,
            impl=impl,
        )
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention_states(outs, lses)
    ref_out, ref_lse = sdpa_truth(q, k, v, q_pos0, scale)
    assert_close(out, lse, ref_out, ref_lse, s["dtype"])
