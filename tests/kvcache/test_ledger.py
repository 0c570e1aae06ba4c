"""DebtLedger: edges, heartbeat authority, rebuild, staleness."""

from __future__ import annotations

import math

import pytest

from infinite_llm.kvcache import DebtLedger, Heartbeat, LendRequest, RManager

from .conftest import real_edges


def hb(instance_id: int, seq: int, *, lent_to=None, borrowed_from=None, free=4) -> Heartbeat:
    return Heartbeat(instance_id, seq, 8, free, 0, 0, 0, free, lent_to or {}, borrowed_from or {})


def test_record_lend_and_release():
    ledger = DebtLedger()
    ledger.record_lend(0, 1, 3)
    ledger.record_lend(0, 1, 2)
    ledger.record_lend(2, 1, 1)
    assert ledger.edges() == {(0, 1): 5, (2, 1): 1}
    assert ledger.lent_by(1) == {0: 5, 2: 1}
    assert ledger.borrowed_by(0) == {1: 5}
    assert ledger.num_remote_blocks == 6
    assert ledger.record_release(0, 1, 5) == 5
    assert ledger.edges() == {(2, 1): 1}
    # A release beyond the recorded debt (stale view) clamps and is counted.
    assert ledger.record_release(2, 1, 3) == 1
    assert ledger.num_corrections == 1
    assert ledger.edges() == {}
    with pytest.raises(ValueError):
        ledger.record_lend(1, 1, 1)
    with pytest.raises(ValueError):
        ledger.record_lend(0, 1, 0)
    ledger.check_integrity()


def test_creditor_heartbeat_is_authoritative():
    ledger = DebtLedger()
    ledger.record_lend(0, 1, 3)
    ledger.record_lend(2, 1, 2)
    assert ledger.on_heartbeat(hb(1, 1, lent_to={0: 1}), now=0.0)
    assert ledger.edges() == {(0, 1): 1}
    # An older heartbeat is ignored.
    assert not ledger.on_heartbeat(hb(1, 1, lent_to={0: 9}), now=0.0)
    assert ledger.edges() == {(0, 1): 1}
    # A debtor's count fills in only creditors not heard from.
    ledger.on_heartbeat(hb(0, 1, borrowed_from={1: 7, 3: 2}), now=0.0)
    assert ledger.edges() == {(0, 1): 1, (0, 3): 2}
    assert ledger.discrepancies() == {(0, 1): (1, 7)}
    ledger.check_integrity()


def test_rebuild_from_a_round_of_heartbeats_equals_reality():
    ms = [RManager(i, 8, lending_cap=1.0) for i in range(3)]
    for creditor, debtor, n in [(0, 1, 2), (1, 2, 3), (2, 0, 1), (0, 2, 1)]:
        granted = ms[creditor].lend(LendRequest(debtor, n)).granted
        ms[debtor].record_borrowed(granted)
    ledger = DebtLedger()
    ledger.record_lend(1, 0, 99)  # garbage from before the restart
    ledger.rebuild([m.heartbeat() for m in ms], now=5.0)
    assert ledger.edges() == real_edges(ms) == {(1, 0): 2, (2, 1): 3, (0, 2): 1, (2, 0): 1}
    assert ledger.discrepancies() == {}
    assert ledger.free_blocks() == {0: 5, 1: 5, 2: 7}
    assert ledger.instance_ids() == [0, 1, 2]


def test_forget_instance_drops_its_edges():
    ledger = DebtLedger()
    ledger.on_heartbeat(hb(1, 1), now=0.0)
    ledger.record_lend(0, 1, 2)
    ledger.record_lend(1, 2, 3)
    ledger.record_lend(0, 2, 1)
    ledger.forget_instance(1)
    assert ledger.edges() == {(0, 2): 1}
    assert ledger.heartbeat(1) is None
    ledger.check_integrity()


def test_age_and_staleness():
    ledger = DebtLedger()
    assert ledger.age(0, now=1.0) == math.inf
    ledger.on_heartbeat(hb(0, 1), now=10.0)
    assert ledger.age(0, now=12.5) == 2.5
    assert not ledger.is_stale(0, now=12.5, timeout_s=3.0)
    assert ledger.is_stale(0, now=13.5, timeout_s=3.0)


def test_check_integrity_catches_a_broken_index():
    ledger = DebtLedger()
    ledger.record_lend(0, 1, 2)
    ledger._lent_by[1][0] = 5
    with pytest.raises(AssertionError):
        ledger.check_integrity()
