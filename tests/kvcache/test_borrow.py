"""The debtor's borrow procedure on 3 in-process instances of 8 blocks (exact ids)."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache import (
    BlockRef,
    BorrowConfig,
    BorrowStats,
    LendReply,
    Recommendation,
    borrow,
    release,
)
from infinite_llm.scheduler.allocator import LocalAllocator

from .conftest import LocalCluster


def refs(instance_id: int, *block_ids: int) -> list[BlockRef]:
    return [BlockRef(instance_id, b) for b in block_ids]


def test_borrow_exact_ids_and_ledger(cluster3: LocalCluster):
    c = cluster3
    b0 = c.borrower(0)
    assert b0.allocate(8) == refs(0, *range(8))
    assert b0.borrow(3) == refs(1, 0, 1, 2)  # 1 and 2 tie on room: lower id first
    assert b0.borrow(3) == refs(2, 0, 1, 2)  # 1 has only 1 left now
    assert c.gm.edges() == {(0, 1): 3, (0, 2): 3}
    assert c.managers[0].borrowed_counts() == {1: 3, 2: 3}
    assert (c.managers[1].num_lent_blocks, c.managers[1].num_free_blocks) == (3, 5)
    c.check()
    b0.release(refs(1, 1) + refs(2, 0, 2))
    assert c.gm.edges() == {(0, 1): 2, (0, 2): 1}
    assert c.managers[1].lent_refs(0) == refs(1, 0, 2)
    assert b0.stats.num_blocks_borrowed == 6 and b0.stats.num_blocks_released == 3
    c.check()


def test_false_reply_is_reported_and_next_candidate_tried(cluster3: LocalCluster):
    c = cluster3
    c.managers[1].allocate(8)  # the gManager still believes 1 can lend 4
    stats = BorrowStats()
    got = borrow(c.managers[0], c.gm, 2, c.send_lend, stats=stats)
    assert got == refs(2, 0, 1)
    assert [cid for cid, _ in c.lend_calls] == [1, 2]
    assert stats.num_false_replies == 1 and stats.num_granted == 1
    assert not c.gm.is_available(1)
    assert c.gm.edges() == {(0, 2): 2}
    assert len(stats.latency) == 1 and stats.latency.summary().max_s > 0
    c.check()


def test_retries_are_bounded_when_every_candidate_refuses(cluster3: LocalCluster):
    c = cluster3
    c.managers[1].allocate(8)
    c.managers[2].allocate(8)
    stats = BorrowStats()
    config = BorrowConfig(max_rounds=3)
    assert borrow(c.managers[0], c.gm, 1, c.send_lend, config=config, stats=stats) is None
    assert [cid for cid, _ in c.lend_calls] == [1, 2]  # round 2 got an empty recommendation
    assert stats.num_rounds == 2 and stats.num_failed == 1
    assert c.managers[0].num_borrowed_blocks == 0
    c.check()


def test_never_more_rounds_than_configured():
    # A gManager whose view never improves (it keeps naming full creditors) must not make
    # the debtor loop: max_rounds rounds of 2 candidates each, then give up.
    c = LocalCluster(3, 8)
    for m in (c.managers[1], c.managers[2]):
        m.allocate(8)

    class LyingGManager:
        def recommend(self, debtor_id: int, num_blocks: int) -> Recommendation:
            return Recommendation(debtor_id, num_blocks, (1, 2))

        def report_false(self, creditor_id: int, num_lendable: int = 0) -> None:
            pass

        def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
            raise AssertionError("nothing was lent")

        record_release = record_lend

    got = borrow(c.managers[0], LyingGManager(), 1, c.send_lend, config=BorrowConfig(4))
    assert got is None
    assert [cid for cid, _ in c.lend_calls] == [1, 2] * 4


def test_split_across_creditors_when_nobody_holds_it_all(cluster3: LocalCluster):
    c = cluster3
    b0 = c.borrower(0)
    assert b0.borrow(6) == refs(1, 0, 1, 2, 3) + refs(2, 0, 1)
    assert b0.stats.num_split == 1
    assert c.gm.edges() == {(0, 1): 4, (0, 2): 2}
    c.check()


def test_split_rolls_back_when_a_share_is_refused(cluster3: LocalCluster):
    c = cluster3
    c.managers[2].allocate(7)  # the view still says 2 can lend 4
    b0 = c.borrower(0)
    assert b0.borrow(6) is None
    assert c.managers[1].num_lent_blocks == 0  # the granted share went back
    assert c.managers[0].num_borrowed_blocks == 0
    assert c.gm.edges() == {}
    c.check()


def test_no_split_without_a_release_transport(cluster3: LocalCluster):
    c = cluster3
    assert borrow(c.managers[0], c.gm, 6, c.send_lend) is None
    assert c.lend_calls == []


def test_allocate_uses_local_blocks_first_all_or_nothing(cluster3: LocalCluster):
    c = cluster3
    b0 = c.borrower(0)
    c.managers[0].allocate(6)
    assert b0.allocate(4) == refs(0, 6, 7) + refs(1, 0, 1)
    assert b0.allocate(20) is None
    assert c.managers[0].num_free_blocks == 0  # nothing kept from the failed call
    b0.free(refs(0, 6) + refs(1, 1))
    assert c.managers[0].num_free_blocks == 1
    assert c.managers[1].lent_refs(0) == refs(1, 0)
    c.check()


def test_creditor_never_borrows_to_serve_a_lend(cluster3: LocalCluster):
    c = cluster3
    b1 = c.borrower(1)
    assert b1.allocate(10) == refs(1, *range(8)) + refs(0, 0, 1)  # 1 is now a debtor, full
    asked: list[int] = []
    real = c.gm.recommend

    def spy(debtor_id: int, num_blocks: int):
        asked.append(debtor_id)
        return real(debtor_id, num_blocks)

    c.gm.recommend = spy  # type: ignore[method-assign]
    reply = c.managers[1].lend(c.managers[2].new_lend_request(1))
    assert not reply.ok and asked == []
    c.lend_calls.clear()
    # The gManager's view of 1 is stale (4 lendable): 1 refuses, 0 lends its own blocks.
    assert c.borrower(2).borrow(2) == refs(0, 2, 3)
    assert [cid for cid, _ in c.lend_calls] == [1, 0]
    assert asked == [2]
    c.check()


def test_release_validates_before_sending(cluster3: LocalCluster):
    c = cluster3
    got = c.borrower(0).borrow(2)
    assert got == refs(1, 0, 1)
    with pytest.raises(ValueError):
        release(c.managers[0], c.gm, got + refs(2, 0), c.send_release)
    with pytest.raises(ValueError):
        release(c.managers[0], c.gm, got + got[:1], c.send_release)
    assert c.managers[1].lent_refs(0) == got
    c.check()


def test_malformed_reply_is_an_error(cluster3: LocalCluster):
    c = cluster3

    def bad_lend(creditor_id, request):
        return LendReply(creditor_id, request.debtor_id, request.request_id, refs(9, 0))

    with pytest.raises(ValueError):
        borrow(c.managers[0], c.gm, 1, bad_lend)


def test_borrow_rejects_non_positive(cluster3: LocalCluster):
    with pytest.raises(ValueError):
        cluster3.borrower(0).borrow(0)


def test_release_transport_error_keeps_refs_recorded(cluster3: LocalCluster):
    c = cluster3
    got = c.borrower(0).borrow(2)

    def broken(creditor_id, msg):
        raise ConnectionError("creditor unreachable")

    with pytest.raises(ConnectionError):
        release(c.managers[0], c.gm, got, broken)
    assert c.managers[0].borrowed_refs() == got  # still recorded, a retry can succeed
    release(c.managers[0], c.gm, got, c.send_release)
    assert c.managers[0].num_borrowed_blocks == 0 and c.gm.edges() == {}
    c.check()


def test_can_borrow_asks_the_gmanager_and_holds_nothing(cluster3: LocalCluster):
    c = cluster3
    b0 = c.borrower(0)
    free = [m.num_free_blocks for m in c.managers.values()]
    assert b0.can_borrow(0) and b0.can_borrow(4)  # one creditor lends 4 (lending cap 0.5)
    assert b0.can_borrow(8)  # split over both
    assert not b0.can_borrow(9)
    assert [m.num_free_blocks for m in c.managers.values()] == free and c.gm.edges() == {}
    alone = LocalAllocator(c.managers[0])
    assert not alone.can_borrow(1) and alone.can_borrow(0)  # alone: never
    c.check()
