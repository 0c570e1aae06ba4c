"""The samples of one request share their prompt's full rBlocks (exact bookkeeping, tiny pools)."""

from __future__ import annotations

from infinite_llm.kvcache.integrity import check_cluster, pool_state
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.allocator import LocalAllocator
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks: int = 12, budget: int = 32) -> tuple[Scheduler, RManager]:
    rm = RManager(0, num_blocks, lending_cap=0.0)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8)
    return Scheduler(config, BS, LocalAllocator(rm)), rm


def samples(parent: str, n: int, prompt_len: int, max_tokens: int = 6) -> list[Request]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    prompt = list(range(1, prompt_len + 1))
    return [
        Request(f"{i}_{parent}", prompt, params, max_tokens, None, parent_id=parent)
        for i in range(n)
    ]


def step(s: Scheduler):
    out = s.schedule()
    sampled = {item.request.request_id: 7 for item in out.scheduled if item.samples}
    s.update_from_output(out, sampled)
    return out


def check(s: Scheduler, rm: RManager) -> None:
    rm.check_integrity()
    tables = ((rid, r.block_table) for rid, r in s.requests.items())
    check_cluster([pool_state(rm, tables, s.allocator.shared.ref_cnts())], {})


def test_samples_wait_for_the_prompt_then_share_its_full_rblocks() -> None:
    s, rm = make()
    reqs = samples("r", 3, prompt_len=10)  # 2 full rBlocks + 2 tokens
    for r in reqs:
        s.add_request(r)
    out = step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("0_r", 10)]
    assert rm.num_used_blocks == 3
    out = step(s)
    # the others recompute only the prompt's last 2 tokens, in an rBlock of their own
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [
        ("0_r", 1),
        ("1_r", 2),
        ("2_r", 2),
    ]
    first = reqs[0].block_table.refs()
    for r in reqs[1:]:
        assert r.block_table.refs()[:2] == first[:2]
        assert r.block_table.refs()[2] not in first
    assert rm.num_used_blocks == 2 + 3  # the full rBlocks once, one tail per sample
    assert s.allocator.shared.ref_cnts() == {first[0]: 3, first[1]: 3}
    check(s, rm)
    while s.has_unfinished_requests():
        step(s)
        check(s, rm)
    assert rm.num_free_blocks == 12 and len(s.allocator.shared) == 0


def test_a_prompt_ending_on_a_block_boundary_leaves_its_last_rblock_unshared() -> None:
    s, rm = make()
    reqs = samples("r", 2, prompt_len=8)
    for r in reqs:
        s.add_request(r)
    step(s)
    out = step(s)
    assert [i.num_new_tokens for i in out.scheduled] == [1, 4]  # the last block recomputed
    assert rm.num_used_blocks == 1 + 2 + 1  # shared, the first's last + new, the second's own


def test_preempting_or_aborting_one_sample_leaves_the_others_their_rblocks() -> None:
    s, rm = make()
    reqs = samples("r", 3, prompt_len=10, max_tokens=8)
    for r in reqs:
        s.add_request(r)
    step(s)
    step(s)
    shared = reqs[0].block_table.refs()[:2]
    s.preempt(reqs[0])  # the first sample, which computed the prompt
    check(s, rm)
    assert s.allocator.shared.ref_cnts() == {shared[0]: 2, shared[1]: 2}
    s.abort_request("2_r")
    assert s.allocator.shared.ref_cnts() == {}
    check(s, rm)
    out = step(s)  # the preempted one (10 + 2 tokens) comes back on what its sibling holds
    assert {i.request.request_id: i.num_new_tokens for i in out.scheduled} == {"1_r": 1, "0_r": 4}
    assert reqs[0].block_table.refs()[:2] == shared
    check(s, rm)
    while s.has_unfinished_requests():
        step(s)
        check(s, rm)
    assert reqs[0].status is RequestStatus.FINISHED_LENGTH
    assert rm.num_free_blocks == 12


def test_a_sample_whose_siblings_are_gone_recomputes_alone() -> None:
    s, rm = make()
    reqs = samples("r", 2, prompt_len=10, max_tokens=1)
    for r in reqs:
        s.add_request(r)
    step(s)  # the first finishes in its prefill step: nothing left to share
    out = step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("1_r", 10)]
    step(s)
    assert rm.num_free_blocks == 12
