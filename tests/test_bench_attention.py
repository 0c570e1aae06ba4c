"""``bench attention`` end to end on a small grid: figures present, results exact, table prints."""

from __future__ import annotations

import random

import pytest
import torch

from infinite_llm.attention import cpu_native
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.merge import merge_attention_states
from infinite_llm.attention.micro import micro_attention
from infinite_llm.bench.attention import run_attention_bench
from infinite_llm.bench.attention_report import format_table
from infinite_llm.bench.attention_shards import cut_shards, kernel_calls, own_pools


def test_small_grid() -> None:
    report = run_attention_bench(
        contexts=[1024, 2000], shard_counts=[1, 4], budget_s=0.01, show_progress=False
    )
    rows = report["results"]
    assert [(r["context"], r["shards"]) for r in rows] == [
        (1024, 1),
        (1024, 4),
        (2000, 1),
        (2000, 4),
    ]
    for r in rows:
        assert r["time_ms"] > 0 and r["mono_ms"] > 0 and r["gbps"] > 0
        assert r["max_abs_err"] < 1e-5
        # the flushes before the timed calls are timed reads: the bandwidth this row is taken against
        assert r["read_gbps_during"] > 0
        assert abs(r["pct_of_bw"] - r["gbps"] / r["read_gbps_during"] * 100) < 1e-9
        if r["shards"] > 1 and cpu_native.native_available():
            assert r["fused_ms"] > 0 and r["fused_max_abs_err"] < 1e-5
            # the same MAs and merge as bare kernel calls, against the monolithic kernel call
            assert r["kernel_split_ms"] > 0 and r["kernel_mono_ms"] > 0
            assert r["kernel_max_abs_err"] < 1e-5
            want = (r["kernel_split_ms"] / r["kernel_mono_ms"] - 1) * 100
            assert abs(r["kernel_overhead_pct"] - want) < 1e-9
        if r["shards"] == 1:
            assert r["kernel_overhead_pct"] is None
        if (
            cpu_native.native_available()
        ):  # the plain read of the rBlocks, on each context's first row
            assert (r["pattern_read_gbps"] is not None) == (r["shards"] == 1)
            if r["shards"] == 1:
                assert r["pattern_read_gbps"] > 0 and r["pct_of_pattern_read"] > 0
    table = format_table(report)
    assert len(table.splitlines()) >= 3 + len(rows)


def test_without_flush_the_start_bandwidth_is_the_reference() -> None:
    report = run_attention_bench(
        contexts=[512], shard_counts=[1], budget_s=0.01, show_progress=False, flush_mib=0
    )
    (row,) = report["results"]
    assert row["read_gbps_during"] is None
    assert row["pct_of_bw"] == row["pct_of_bw_start"] > 0


def test_block_size_is_a_parameter() -> None:
    """128-token rBlocks (vLLM's CPU default), a context that ends inside a block: still exact."""
    report = run_attention_bench(
        contexts=[1000],
        shard_counts=[1, 3],
        budget_s=0.01,
        show_progress=False,
        flush_mib=0,
        block_size=128,
    )
    assert report["config"]["block_size"] == 128
    for r in report["results"]:
        assert r["max_abs_err"] < 1e-5
        if r["shards"] > 1 and cpu_native.native_available():
            assert r["fused_max_abs_err"] < 1e-5
    assert "block_size=128" in format_table(report)


@pytest.mark.parametrize("layout", ["shuffled", "contiguous"])
def test_every_shard_gets_a_pool_holding_exactly_its_blocks(layout: str) -> None:
    """The split row's pools (one per shard, as on S instances): each holds its shard's rBlocks
    and nothing else, every request's table in it names the same K and V as in the one pool."""
    shape = (3, 40, 4, 8)
    k, v = torch.randn(shape), torch.randn(shape)
    order = list(range(40))
    random.Random(1).shuffle(order)
    block_ids, contexts = [order[:25], order[25:]], [99, 57]  # two requests, ragged last blocks
    batches = cut_shards(block_ids, contexts, 3, 4)
    pools = own_pools(k, v, batches, layout, seed=0)
    assert sum(sk.shape[1] for sk, _, _ in pools) == 40
    for (sk, sv, own), shard in zip(pools, batches):
        assert isinstance(own, MABatch) and own.context_lens == shard.context_lens
        assert sorted(b for blocks in own.block_ids for b in blocks) == list(range(sk.shape[1]))
        for mine, theirs in zip(own.block_ids, shard.block_ids):
            assert torch.equal(sk[:, mine], k[:, theirs]) and torch.equal(sv[:, mine], v[:, theirs])
        if layout == "contiguous":
            assert [b for blocks in own.block_ids for b in blocks] == list(range(sk.shape[1]))


@pytest.mark.skipif(not cpu_native.native_available(), reason="needs the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_calls_compute_the_split_attention(dtype: torch.dtype) -> None:
    """The bare kernel calls that the 'kernel' column times: every shard's MA and the merge,
    the same result as micro_attention per shard merged, run after run (two requests, ragged
    contexts, three shards, one of them empty for the shorter request)."""
    shape = (3, 40, 4, 64)
    k, v = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    order = list(range(40))
    random.Random(2).shuffle(order)
    block_ids, contexts = [order[:30], order[30:32]], [118, 6]
    shards = own_pools(k, v, cut_shards(block_ids, contexts, 3, 4), "shuffled", seed=0)
    assert [b.context_lens[1] for _, _, b in shards] == [4, 2, 0]  # the last shard: none of it
    q = torch.randn(2, 9, 64).to(dtype)
    # float32 queries: the states stay float32, as the kernel calls keep them
    states = [micro_attention(q.float(), sk, sv, b, 0.125) for sk, sv, b in shards]
    want, _ = merge_attention_states([o for o, _ in states], [lse for _, lse in states])
    calls = kernel_calls(q, shards, 0.125)
    assert calls is not None
    run, result = calls
    for _ in range(2):  # the merge goes into the first state, which the next run rewrites
        run()
        assert result().dtype == torch.float32
        assert torch.allclose(result(), want, atol=1e-5, rtol=0)
