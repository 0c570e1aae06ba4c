"""Incremental placement counts and ``step_work`` against brute force over whole block tables."""

from __future__ import annotations

from collections import Counter

from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request
from infinite_llm.sim.cluster import SimCluster
from infinite_llm.sim.placement import full_counts, step_work

from .helpers import small_config

PARAMS = SamplingParams(max_tokens=None, ignore_eos=True)


def brute_force(out, home, block_size):
    """Per instance: (ctx tokens, pairs, writes), token by token."""
    ctx, pairs, writes = Counter(), Counter(), Counter()
    for item in out.scheduled:
        r, new = item.request, item.num_new_tokens
        table = r.block_table.refs()
        for pos in range(r.num_computed_tokens):
            inst = table[pos // block_size].instance_id
            ctx[inst] += 1
            pairs[inst] += new
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + new):
            writes[table[pos // block_size].instance_id] += 1
    return ctx, pairs, writes


def test_step_work_matches_brute_force_through_borrowing_preemption_and_defrag():
    cluster = SimCluster(small_config(num_instances=3, num_blocks=10), clock=lambda: 0.0)
    sizes = [(30, 12), (7, 20), (45, 9), (3, 30), (19, 19), (60, 6), (11, 3)]
    for i, (p, o) in enumerate(sizes):
        cluster.add_request(
            Request(str(i), range(p), PARAMS, o), home=i % 2
        )  # instance 2 only lends
    bs = cluster.block_size
    finished, steps, moved = set(), 0, 0
    while cluster.has_unfinished_requests():
        for i, inst in cluster.instances.items():
            out = inst.scheduler.schedule()
            for r in out.preempted:
                cluster.tracker.forget(r)
            if out.is_empty:
                continue
            fast = step_work(out, i, bs, cluster.tracker.counts)
            slow = step_work(out, i, bs, full_counts)
            assert fast == slow
            ctx, pairs, writes = brute_force(out, i, bs)
            assert {s.instance_id: s.ctx_tokens for s in fast.shards if s.ctx_tokens} == dict(ctx)
            assert {s.instance_id: s.pairs for s in fast.shards if s.pairs} == dict(pairs)
            assert {s.instance_id: s.num_writes for s in fast.shards if s.num_writes} == dict(
                writes
            )
            assert fast.num_new_tokens == sum(s.num_new_tokens for s in out.scheduled)
            sampled = {s.request.request_id: 0 for s in out.scheduled if s.samples}
            for res in inst.scheduler.update_from_output(out, sampled):
                if res.finished:
                    cluster.tracker.forget(res.request)
                    finished.add(res.request.request_id)
        steps += 1
        if steps % 3 == 0:
            moved += len(cluster.defragment())
        cluster.check_integrity()
        assert steps < 500
    assert finished == {str(i) for i in range(len(sizes))}
    assert cluster.borrow_stats.num_blocks_borrowed > 0
    assert cluster.all_free()
