"""Scheduler bookkeeping on small exact pools: budgets, chunking, FCFS, preemption, freeing."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.allocator import LocalAllocator
from infinite_llm.scheduler.order import cluster_order
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks: int = 12, budget: int = 16, max_seqs: int = 8) -> tuple[Scheduler, RManager]:
    rm = RManager(0, num_blocks, lending_cap=0.0)
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        BS,
        LocalAllocator(rm),
    ), rm


def req(rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(
        rid,
        list(range(1, prompt_len + 1)),
        SamplingParams(temperature=0, max_tokens=max_tokens),
        max_tokens=max_tokens,
        eos_token_id=None,
    )


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {item.request.request_id: token for item in out.scheduled if item.samples}
    return out, s.update_from_output(out, sampled)


def test_prefill_is_chunked_under_the_token_budget() -> None:
    s, rm = make(budget=6)
    r = req("a", 10)
    s.add_request(r)
    out, _ = step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 6)]
    # admitted with the rBlocks of its whole prompt (10 tokens -> 3 blocks of 4), filled chunk by chunk
    assert r.block_table.refs() == [BlockRef(0, 0), BlockRef(0, 1), BlockRef(0, 2)]
    out, results = step(s)
    assert (
        out.scheduled[0].num_new_tokens == 4 and results[0].new_token_id == 7
    )  # prompt done: sampled
    assert r.num_computed_tokens == 10 and r.output_token_ids == [7]
    assert r.block_table.refs() == [BlockRef(0, 0), BlockRef(0, 1), BlockRef(0, 2)]
    out, _ = step(s)
    assert out.scheduled[0].num_new_tokens == 1  # decode
    rm.check_integrity()


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    s, _ = make(budget=8)
    a, b = req("a", 3), req("b", 20)
    s.add_request(a)
    step(s)  # a prefilled
    s.add_request(b)
    out, _ = step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 7)]


def test_fcfs_head_of_line_waits_for_memory() -> None:
    s, rm = make(num_blocks=6, budget=64)
    big, small = req("big", 20, max_tokens=2), req("small", 2, max_tokens=2)  # big needs 5 blocks
    s.add_request(req("first", 4, max_tokens=8))  # takes 1 block, 2 once it decodes
    step(s)
    s.add_request(big)
    s.add_request(small)
    out, _ = step(s)
    # first holds 2 blocks after its decode, 4 are free: big (5 blocks) waits, and small must
    # not overtake it (FCFS).
    assert [i.request.request_id for i in out.scheduled] == ["first"]
    assert s.num_waiting == 2 and rm.num_free_blocks == 4


def test_preemption_frees_the_newest_and_resumes_it_later() -> None:
    s, rm = make(num_blocks=4, budget=64)
    a, b = req("a", 8, max_tokens=6), req("b", 8, max_tokens=6)  # 2 full blocks each
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert rm.num_free_blocks == 0
    out, _ = step(s)  # a's decode writes token 9: a 3rd block, so b is preempted
    assert out.preempted == [b] and b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table.refs() == [] and b.output_token_ids == [7]  # keeps its output
    while a.status is RequestStatus.RUNNING:
        step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH and len(a.output_token_ids) == 6
    out, _ = step(s)  # b resumes: recomputes prompt + its 1 output token
    assert out.scheduled[0].request is b and out.scheduled[0].num_new_tokens == 9
    rm.check_integrity()


def test_abort_frees_blocks_in_any_state() -> None:
    s, rm = make(num_blocks=8)
    s.add_request(req("a", 9))
    s.add_request(req("b", 30))  # waits (needs 8 blocks, 5 left)
    step(s)
    assert s.abort_request("a").status is RequestStatus.FINISHED_ABORTED
    assert s.abort_request("b").status is RequestStatus.FINISHED_ABORTED
    assert s.abort_request("b") is None
    assert rm.num_free_blocks == 8 and not s.has_unfinished_requests()
    rm.check_integrity()


def test_max_num_seqs_caps_running_requests() -> None:
    s, _ = make(num_blocks=64, budget=64, max_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), 2))
    out, _ = step(s)
    assert len(out.scheduled) == 2 and s.num_waiting == 2


@pytest.mark.parametrize("stop", ["eos", "stop_token", "length"])
def test_token_level_stops(stop: str) -> None:
    s, rm = make()
    params = SamplingParams(
        temperature=0, max_tokens=3, stop_token_ids=[9] if stop == "stop_token" else None
    )
    r = Request("a", [1, 2], params, max_tokens=3, eos_token_id=5)
    s.add_request(r)
    token = {"eos": 5, "stop_token": 9, "length": 4}[stop]
    while r.status is RequestStatus.WAITING or r.status is RequestStatus.RUNNING:
        step(s, token)
    expected = RequestStatus.FINISHED_LENGTH if stop == "length" else RequestStatus.FINISHED_STOPPED
    assert r.status is expected
    assert len(r.output_token_ids) == (3 if stop == "length" else 1)
    assert rm.num_free_blocks == rm.num_blocks


def test_waiting_queue_is_in_arrival_order_whatever_the_order_of_adds() -> None:
    sched, _ = make()
    first, second, third = (req(f"r{i}", 8) for i in range(3))
    for request in (third, first, second):
        sched.add_request(request)
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2"]
    out, _ = step(sched)
    assert [item.request.request_id for item in out.scheduled] == [
        "r0",
        "r1",
    ]  # budget 16: two prompts


def test_running_requests_keep_what_they_are_about_to_need_from_lending() -> None:
    rm = RManager(0, 12, lending_cap=1.0)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=6, max_num_seqs=8), BS, LocalAllocator(rm))
    a, b = req("a", 10, max_tokens=2), req("b", 3, max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: 6 of 10 prompt tokens, holding its prompt's 3 blocks; b waits for the budget
    # a's 2 output tokens end at 12 tokens: inside its 3 blocks, nothing more to keep
    assert s.blocks_needed_soon() == 0 and rm.num_lendable_blocks == 12 - 3
    step(s)  # a's prompt done (plus 1 output token); b admitted with its 1 block, 2 of 3 tokens in
    # b's next 4 tokens end at 7: a 2nd block, kept from lending
    assert s.blocks_needed_soon() == 1
    assert rm.num_lendable_blocks == 12 - 4 - 1
    while s.has_unfinished_requests():
        step(s)
    assert rm.num_lendable_blocks == 12  # nothing held, nothing kept back
    rm.check_integrity()


def test_a_preempted_request_comes_back_only_when_its_whole_prompt_fits() -> None:
    # 8 blocks of 4 tokens. a grows to 24 tokens (6 blocks); b's prompt needs 4 blocks. Admitted a
    # chunk at a time, b would come back after each preemption with one chunk's block and be
    # preempted again as a grows (each time recomputing); holding its whole prompt, it is
    # preempted once and waits until a's growth leaves room for all of it.
    s, rm = make(num_blocks=8, budget=4)
    a, b = req("a", 12, max_tokens=12), req("b", 16, max_tokens=4)
    s.add_request(a)
    step(s)
    s.add_request(b)
    steps = 0
    while s.has_unfinished_requests():
        step(s)
        steps += 1
        assert steps < 100
        rm.check_integrity()
    assert a.num_preemptions == 0 and b.num_preemptions <= 1 and s.num_preemptions <= 1
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 4


def test_pending_tokens_count_prefill_left_and_output_left() -> None:
    """The router's load signal through a chunked prefill, decodes and a preemption."""
    s, rm = make(num_blocks=4, budget=6)
    a, b = req("a", 8, max_tokens=6), req("b", 8, max_tokens=6)  # 2 full blocks each
    s.add_request(a)
    s.add_request(b)
    assert (a.num_pending_tokens, s.num_pending_tokens) == (8 + 6, 28)
    step(s)  # a: 6 of its 8 prompt tokens (the budget)
    assert a.num_pending_tokens == 2 + 6
    step(s)  # a: its last 2, then samples; b: 4 of 8
    assert a.num_pending_tokens == 1 + 5  # the sampled token is not computed yet
    assert b.num_pending_tokens == 4 + 6
    assert rm.num_free_blocks == 0
    out, _ = step(s)  # a's decode needs a 3rd block: b is preempted, its 4 tokens to compute again
    assert out.preempted == [b] and b.num_computed_tokens == 0
    assert b.num_pending_tokens == 8 + 6 and a.num_pending_tokens == 1 + 4
    assert s.num_pending_tokens == 14 + 5
    while s.has_unfinished_requests():
        step(s)
    assert s.num_pending_tokens == 0 and a.num_pending_tokens == b.num_pending_tokens == 0
    rm.check_integrity()


def test_an_admission_that_must_borrow_leaves_room_for_the_running_requests_next_blocks() -> None:
    """Instance 0 holds 4 rBlocks, its peer lends 1. a (3 rBlocks) runs and is about to take a
    4th; b's prompt needs 2, 1 of them borrowed. Admitted on the peer's only lendable rBlock, b
    would be preempted by a's growth at the next step and its prefill recomputed; it waits for
    a instead, and no request is preempted."""
    from infinite_llm.kvcache import Borrower, GManager, GManagerConfig

    home, peer = RManager(0, 4, lending_cap=0.0), RManager(1, 2, lending_cap=0.5)
    gm = GManager(
        GManagerConfig(resort_every_heartbeats=1, resort_interval_s=0.0, heartbeat_timeout_s=1e9)
    )
    borrower = Borrower(home, gm, lambda c, r: peer.lend(r), lambda c, r: peer.reclaim(r))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8), BS, borrower)
    a, b = req("a", 12, max_tokens=8), req("b", 8, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    steps = 0
    while s.has_unfinished_requests():
        for m in (home, peer):
            gm.on_heartbeat(m.heartbeat())
        out, _ = step(s)
        if steps == 0:
            assert [item.request for item in out.scheduled] == [
                a
            ]  # b waits: no room for a's 4th block
        steps += 1
        assert steps < 100
        home.check_integrity()
        peer.check_integrity()
    assert s.num_preemptions == 0 and b.num_preemptions == 0
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 2
    assert home.num_free_blocks == 4 and peer.lent_counts().get(0, 0) == 0  # everything given back


def borrowing_scheduler(home_blocks: int, peer_blocks: int, budget: int = 64):
    """A scheduler on ``home_blocks`` whose peer lends all of its ``peer_blocks``."""
    from infinite_llm.kvcache import Borrower, GManager, GManagerConfig

    home, peer = (
        RManager(0, home_blocks, lending_cap=0.0),
        RManager(1, peer_blocks, lending_cap=1.0),
    )
    gm = GManager(
        GManagerConfig(resort_every_heartbeats=1, resort_interval_s=0.0, heartbeat_timeout_s=1e9)
    )
    borrower = Borrower(home, gm, lambda c, r: peer.lend(r), lambda c, r: peer.reclaim(r))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), BS, borrower)
    return s, home, peer, gm


def beat_and_step(s: Scheduler, home: RManager, peer: RManager, gm):
    for m in (home, peer):
        gm.on_heartbeat(m.heartbeat())
    return step(s)[0]


def run_checked(s: Scheduler, home: RManager, peer: RManager, gm) -> list:
    """Step until done, with heartbeats and integrity checks; every step's output."""
    outs = []
    while s.has_unfinished_requests():
        outs.append(beat_and_step(s, home, peer, gm))
        assert len(outs) < 200
        home.check_integrity()
        peer.check_integrity()
    return outs


def test_a_request_longer_than_its_home_pool_is_preempted_last() -> None:
    """Home 4 rBlocks + 4 borrowed. b's prompt (5 rBlocks) is longer than the home pool: it
    ranks older than a, which fits, though a arrived first. When a's decodes and b's together
    outgrow the 8 rBlocks, a (cheap to recompute) yields, not b (a pool's worth of prefill)."""
    s, home, peer, gm = borrowing_scheduler(4, 4)
    a, b = req("a", 4, max_tokens=12), req("b", 17, max_tokens=8)
    assert s.rank(a) > s.rank(b) and a.arrival_seq < b.arrival_seq
    s.add_request(a)
    beat_and_step(s, home, peer, gm)
    s.add_request(b)
    outs = run_checked(s, home, peer, gm)
    assert b.num_preemptions == 0 and a.num_preemptions >= 1
    assert [r for o in outs for r in o.preempted] == [a] * a.num_preemptions
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 8
    assert home.num_free_blocks == 4 and peer.lent_counts().get(0, 0) == 0


def test_a_victim_scheduled_earlier_in_the_step_is_taken_back() -> None:
    """a (fits) runs ahead of b (longer than the home pool) in the step's order. When b's decode
    needs a 6th rBlock of the 7, a has already been scheduled in that step and needs none: a is
    preempted and taken out of the step."""
    s, home, peer, gm = borrowing_scheduler(4, 3)
    a, b = req("a", 2, max_tokens=8), req("b", 17, max_tokens=12)
    s.add_request(a)
    s.add_request(b)
    for _ in range(4):  # a decodes on 2 rBlocks, b on 5 (2 borrowed): all 7 in use
        out = beat_and_step(s, home, peer, gm)
        assert out.preempted == [] and s.running == [a, b]
    assert len(a.block_table) * BS > a.num_computed_tokens  # a's next token has its slot
    out = beat_and_step(s, home, peer, gm)
    assert out.preempted == [a] and [item.request for item in out.scheduled] == [b]
    assert out.num_batched_tokens == 1 and a.num_computed_tokens == 0
    run_checked(s, home, peer, gm)
    assert b.num_preemptions == 0 and a.num_preemptions == 1
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 12


def test_a_request_longer_than_its_home_pool_holds_the_way_to_borrowed_memory_while_it_prefills() -> (
    None
):
    """While b (6 rBlocks on a home of 4) prefills, its rank is reported as prefilling, not as
    blocked: another instance still admits a younger request that fits its pool's free rBlocks
    (small), but not one that would have to borrow (mid: 3 rBlocks where 2 are free), which
    goes in once b's prompt is."""
    s, home, peer, gm = borrowing_scheduler(4, 8, budget=8)
    b = req("b", 24, max_tokens=4)
    s.add_request(b)
    beat_and_step(s, home, peer, gm)
    assert b.num_computed_tokens == 8 and s.prefilling_rank == s.rank(b)
    assert s.blocked_rank is None
    other, ohome, opeer, ogm = borrowing_scheduler(3, 8, budget=16)
    small, mid = req("small", 4), req("mid", 12)
    other.add_request(small)
    other.add_request(mid)
    other.set_cluster_order(cluster_order({0: s.order_report, 1: other.order_report})[1])
    assert other.prefill_way == s.rank(b) and other.right_of_way is None
    out = beat_and_step(other, ohome, opeer, ogm)
    assert [item.request for item in out.scheduled] == [small]
    assert mid.status is RequestStatus.WAITING and opeer.lent_counts().get(0, 0) == 0
    while b.num_computed_tokens < 24:
        beat_and_step(s, home, peer, gm)
    beat_and_step(s, home, peer, gm)  # the first step that schedules b as a decode
    assert b.num_output_tokens == 2 and s.prefilling_rank is None
    other.set_cluster_order(cluster_order({0: s.order_report, 1: other.order_report})[1])
    assert other.prefill_way is None
    out = beat_and_step(other, ohome, opeer, ogm)
    assert mid in [item.request for item in out.scheduled] and opeer.lent_counts()[0] >= 1


def test_a_stalled_request_holds_every_younger_request_back() -> None:
    """The right of way of a request stalled for memory (``blocked_rank``) holds back even a
    younger request that fits its own pool's free rBlocks, so that memory freed anywhere goes
    to the stalled one first."""
    other, _ = make()
    small = req("small", 4)
    other.add_request(small)
    other.set_cluster_order(((0, -1), None, None))  # an older request stalled elsewhere
    assert other.schedule().scheduled == [] and small.status is RequestStatus.WAITING
    other.set_cluster_order((None, None, (0, -1)))  # the same one prefilling instead
    assert [item.request for item in other.schedule().scheduled] == [small]


def test_a_request_longer_than_its_home_pool_waits_until_the_cluster_has_room_for_it() -> None:
    """b's prompt needs 7 rBlocks; home 4 and a peer lending 4, but a holds 2 of the home's.
    Admitted a chunk at a time anyway, b would take what is free and then run out mid-prefill;
    it waits, holding nothing, until a has finished."""
    s, home, peer, gm = borrowing_scheduler(4, 4, budget=8)
    a, b = req("a", 8, max_tokens=6), req("b", 28, max_tokens=2)
    s.add_request(a)
    beat_and_step(s, home, peer, gm)
    s.add_request(b)
    while a.status is RequestStatus.RUNNING:
        beat_and_step(s, home, peer, gm)
        if a.status is RequestStatus.RUNNING:
            assert b.status is RequestStatus.WAITING and b.block_table.refs() == []
            assert s.blocked_rank == s.rank(b)
    run_checked(s, home, peer, gm)
    assert s.num_preemptions == 0 and len(b.output_token_ids) == 2
    assert home.num_free_blocks == 4 and peer.lent_counts().get(0, 0) == 0


def test_a_request_longer_than_its_home_pool_starts_only_with_the_gmanagers_prefill_claim() -> None:
    """The gManager decides at once who prefills past its pool: while instance 2 holds a claim
    (even one younger than b, made in the same round), b waits, holding nothing and reported
    neither as blocked nor as prefilling; once the claim is released, b takes it."""
    s, home, peer, gm = borrowing_scheduler(4, 8, budget=8)
    b = req("b", 24, max_tokens=4)
    s.add_request(b)
    assert gm.claim_prefill(2, (0, b.arrival_seq + 1))
    for _ in range(2):
        out = beat_and_step(s, home, peer, gm)
        assert out.scheduled == [] and b.status is RequestStatus.WAITING
        assert b.block_table.refs() == [] and s.blocked_rank is None and s.prefilling_rank is None
    gm.sync_prefills(2, [])
    out = beat_and_step(s, home, peer, gm)
    assert [item.request for item in out.scheduled] == [b] and s.prefilling_rank == s.rank(b)
    assert gm.prefill_way(2) == s.rank(b) and not gm.claim_prefill(2, (0, -1))


def test_the_prefill_claim_is_released_once_the_prompt_is_in_or_the_request_ends() -> None:
    s, home, peer, gm = borrowing_scheduler(4, 8, budget=8)
    b = req("b", 24, max_tokens=4)
    s.add_request(b)
    while b.num_computed_tokens < 24:
        beat_and_step(s, home, peer, gm)
        if b.num_computed_tokens < 24:
            assert gm.prefill_way(2) == s.rank(b)
    beat_and_step(s, home, peer, gm)  # the first step that schedules b as a decode
    assert gm.prefill_way(2) is None and s.prefilling_rank is None
    run_checked(s, home, peer, gm)
    # One that ends with its prompt (a single token to generate) is not scheduled again: the
    # claim goes when it finishes.
    c = req("c", 24, max_tokens=1)
    s.add_request(c)
    while c.status is RequestStatus.RUNNING or c.status is RequestStatus.WAITING:
        beat_and_step(s, home, peer, gm)
    assert not s.has_unfinished_requests() and gm.prefill_way(2) is None


def test_a_request_that_would_borrow_yields_to_a_claim_made_elsewhere_in_the_same_round() -> None:
    """mid (3 rBlocks, 2 free here) would borrow: it waits behind a prefill claimed on another
    instance now, which the last step's reports (``prefill_way``) do not show yet."""
    s, home, peer, gm = borrowing_scheduler(4, 8, budget=16)
    a, mid = req("a", 8, max_tokens=8), req("mid", 12)
    s.add_request(a)
    beat_and_step(s, home, peer, gm)
    s.add_request(mid)
    assert gm.claim_prefill(2, (0, -1)) and s.prefill_way is None
    out = beat_and_step(s, home, peer, gm)
    assert [item.request for item in out.scheduled] == [a] and mid.status is RequestStatus.WAITING
    gm.sync_prefills(2, [])
    out = beat_and_step(s, home, peer, gm)
    assert mid in [item.request for item in out.scheduled] and peer.lent_counts()[0] >= 1
