"""Exact bookkeeping of one RManager: block ids, states, cap, validation, heartbeat."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache import BlockRef, LendRequest, Release, RManager, RManagerConfig


def refs(instance_id: int, *block_ids: int) -> list[BlockRef]:
    return [BlockRef(instance_id, b) for b in block_ids]


def test_allocate_lowest_ids_first_and_reuses_freed():
    m = RManager(0, 8)
    assert m.allocate(3) == refs(0, 0, 1, 2)
    assert m.allocate(2) == refs(0, 3, 4)
    m.free(refs(0, 1, 3))
    assert m.allocate(3) == refs(0, 1, 3, 5)
    assert (m.num_free_blocks, m.num_used_blocks) == (2, 6)
    m.check_integrity()


def test_allocate_is_all_or_nothing():
    m = RManager(0, 4)
    assert m.allocate(3) == refs(0, 0, 1, 2)
    assert not m.can_allocate(2)
    assert m.allocate(2) is None
    assert m.num_free_blocks == 1
    assert m.can_allocate(1)
    assert m.allocate(0) == []
    with pytest.raises(ValueError):
        m.allocate(-1)


def test_free_rejects_bad_refs_without_freeing_anything():
    m = RManager(1, 4)
    m.allocate(2)
    for bad in (
        refs(1, 0, 2),  # 2 is free: a double free
        refs(1, 0, 0),  # duplicate in one call
        [BlockRef(1, 0), BlockRef(2, 1)],  # another instance's block
        refs(1, 0, 9),  # out of range
    ):
        with pytest.raises(ValueError):
            m.free(bad)
        assert m.num_used_blocks == 2, bad
    m.free(refs(1, 0))
    with pytest.raises(ValueError):
        m.free(refs(1, 0))
    m.check_integrity()


def test_lend_respects_cap_and_is_never_partial():
    m = RManager(0, 8, lending_cap=0.5)
    assert m.max_lent_blocks == 4
    reply = m.lend(LendRequest(debtor_id=1, num_blocks=3, request_id=7))
    assert reply.ok and reply.granted == refs(0, 0, 1, 2)
    assert (reply.creditor_id, reply.debtor_id, reply.request_id) == (0, 1, 7)
    assert reply.num_lendable == 1
    refused = m.lend(LendRequest(2, 2))
    assert not refused.ok and refused.granted is None and refused.num_lendable == 1
    assert m.num_lent_blocks == 3  # nothing taken by the refusal
    assert m.lend(LendRequest(2, 1)).granted == refs(0, 3)
    assert m.num_lendable_blocks == 0
    # Own requests may still use every free block.
    assert m.allocate(4) == refs(0, 4, 5, 6, 7)
    assert m.lent_counts() == {1: 3, 2: 1}
    m.check_integrity()


def test_lend_limited_by_free_blocks_too():
    m = RManager(0, 4, lending_cap=1.0)
    m.allocate(2)
    assert not m.can_lend(3)
    assert not m.lend(LendRequest(1, 3)).ok
    assert m.lend(LendRequest(1, 2)).granted == refs(0, 2, 3)


def test_zero_cap_disables_lending():
    m = RManager(0, 8, lending_cap=0.0)
    assert m.num_lendable_blocks == 0
    assert not m.lend(LendRequest(1, 1)).ok
    assert m.num_free_blocks == 8


def test_lend_rejects_self_and_empty_requests():
    m = RManager(0, 8)
    with pytest.raises(ValueError):
        m.lend(LendRequest(0, 1))
    with pytest.raises(ValueError):
        m.lend(LendRequest(1, 0))


def test_reclaim_checks_the_debtor():
    m = RManager(0, 8, lending_cap=1.0)
    m.lend(LendRequest(1, 2))  # blocks 0, 1
    m.lend(LendRequest(2, 2))  # blocks 2, 3
    with pytest.raises(ValueError):
        m.reclaim(Release(1, refs(0, 1, 2)))  # 2 is lent to 2, not 1
    assert m.num_lent_blocks == 4
    with pytest.raises(ValueError):
        m.free(refs(0, 0))  # lent blocks are not freed by the owner
    m.reclaim(Release(1, refs(0, 1)))
    assert m.lent_refs(1) == refs(0, 0)
    assert m.allocate(1) == refs(0, 1)
    assert m.reclaim_all(2) == 2
    assert m.reclaim_all(2) == 0
    assert m.lent_counts() == {1: 1}
    m.check_integrity()


def test_repossess_turns_lent_into_used():
    m = RManager(0, 4, lending_cap=1.0)
    m.lend(LendRequest(1, 2))
    with pytest.raises(ValueError):
        m.repossess(2, refs(0, 0))
    m.repossess(1, refs(0, 1))
    assert (m.num_used_blocks, m.num_lent_blocks, m.num_free_blocks) == (1, 1, 2)
    assert m.owner_of(0) == 1 and m.owner_of(1) == 0 and m.owner_of(2) is None
    assert m.block_owners() == [1, 0, None, None]
    m.free(refs(0, 1))
    m.check_integrity()


def test_debtor_bookkeeping():
    m = RManager(0, 4)
    m.record_borrowed(refs(1, 5, 6) + refs(2, 0))
    assert m.num_borrowed_blocks == 3
    assert m.borrowed_counts() == {1: 2, 2: 1}
    assert m.borrowed_refs(1) == refs(1, 5, 6)
    with pytest.raises(ValueError):
        m.record_borrowed(refs(1, 5))  # already held
    with pytest.raises(ValueError):
        m.record_borrowed(refs(0, 1))  # local
    with pytest.raises(ValueError):
        m.record_returned(refs(1, 5, 7))  # 7 never borrowed
    assert m.num_borrowed_blocks == 3
    m.record_returned(refs(1, 6))
    assert m.drop_borrowed_from(1) == refs(1, 5)
    assert m.borrowed_refs() == refs(2, 0)
    m.check_integrity()


def test_heartbeat_reports_everything_with_rising_seq():
    m = RManager(3, 8, lending_cap=0.5)
    m.allocate(2)
    m.lend(LendRequest(1, 3))
    m.record_borrowed(refs(4, 0))
    hb1, hb2 = m.heartbeat(), m.heartbeat()
    assert hb2.seq == hb1.seq + 1
    assert (hb1.instance_id, hb1.num_blocks, hb1.num_free, hb1.num_used) == (3, 8, 3, 2)
    assert (hb1.num_lent, hb1.num_borrowed, hb1.lendable) == (3, 1, 1)
    assert hb1.lent_to == {1: 3} and hb1.borrowed_from == {4: 1}


def test_new_lend_request_ids_increase():
    m = RManager(5, 4)
    a, b = m.new_lend_request(2), m.new_lend_request(1)
    assert (a.debtor_id, a.num_blocks) == (5, 2)
    assert b.request_id > a.request_id


def test_config_validation_and_cap_rounding():
    with pytest.raises(ValueError):
        RManager(0, -1)
    with pytest.raises(ValueError):
        RManagerConfig(lending_cap=1.5)
    m = RManager.from_config(2, 10, RManagerConfig(lending_cap=0.25))
    assert (m.instance_id, m.num_blocks, m.max_lent_blocks) == (2, 10, 2)
    assert RManager(0, 100, lending_cap=0.29).max_lent_blocks == 29  # not 28 (float error)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: setattr(m, "_num_used", m._num_used + 1),
        lambda m: m._free._heap.append(m._free._heap[0]),
        lambda m: m._state.__setitem__(7, 2),  # LENT with no debtor
        lambda m: m._lent._to.setdefault(9, set()).add(0),
        lambda m: setattr(m._borrowed, "_num_blocks", 1),
    ],
)
def test_check_integrity_catches_corruption(corrupt):
    m = RManager(0, 8)
    m.allocate(2)
    m.lend(LendRequest(1, 1))
    m.check_integrity()
    corrupt(m)
    with pytest.raises(AssertionError):
        m.check_integrity()


def test_reserved_blocks_are_not_lent_but_stay_allocatable():
    m = RManager(0, 8, lending_cap=1.0)
    m.reserve(3)
    assert m.num_lendable_blocks == 5 and m.heartbeat().lendable == 5
    refused = m.lend(LendRequest(1, 6))
    assert refused.granted is None and refused.num_lendable == 5
    assert m.lend(LendRequest(1, 5)).granted == refs(0, 0, 1, 2, 3, 4)
    assert m.num_lendable_blocks == 0
    assert m.allocate(3) == refs(0, 5, 6, 7)  # the reserve is for own requests
    m.reserve(0)
    assert m.num_lendable_blocks == 0  # nothing free
    with pytest.raises(ValueError):
        m.reserve(-1)
    m.check_integrity()
