"""GManager: ranking, spreading, false replies, staleness, periodic sorting, splitting."""

from __future__ import annotations

import threading

import pytest

from infinite_llm.kvcache import GManager, GManagerConfig, Heartbeat, LendRequest, RManager

from .conftest import EAGER, FakeClock, LocalCluster


def lendable_hb(instance_id: int, lendable: int, seq: int = 1) -> Heartbeat:
    return Heartbeat(instance_id, seq, 64, lendable, 0, 0, 0, lendable)


def gm_with(lendables: dict[int, int], config=EAGER, clock=None) -> GManager:
    gm = GManager(config, clock=clock or FakeClock())
    for i, n in lendables.items():
        gm.on_heartbeat(lendable_hb(i, n))
    return gm


def test_candidates_ranked_by_room_never_the_debtor():
    gm = gm_with({0: 5, 1: 9, 2: 7, 3: 2})
    rec = gm.recommend(debtor_id=1, num_blocks=3)
    assert rec.creditor_ids == (2, 0)  # 1 is the debtor, 3 lacks room
    assert rec.split == () and not rec.is_empty
    assert gm.available(2) == 4  # reserved on the first candidate


def test_creditors_owing_the_debtor_come_last():
    gm = gm_with({0: 0, 1: 9, 2: 5, 3: 7})
    gm.record_lend(1, 0, 2)  # 1 owes 0: lending to 0 would close a cycle
    assert gm.recommend(0, 3).creditor_ids == (3, 2, 1)


def test_reservations_spread_concurrent_debtors():
    gm = gm_with({0: 8, 1: 8, 2: 8, 3: 0})
    firsts = [gm.recommend(3, 4).creditor_ids[0] for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]
    assert gm.recommend(3, 1).is_empty
    gm.record_lend(3, 0, 4)  # the lend consumed the reservation, not twice
    assert gm.available(0) == 0


def test_false_reply_skips_creditor_until_more_room():
    gm = gm_with({0: 0, 1: 6, 2: 5})
    assert gm.recommend(0, 2).creditor_ids == (1, 2)
    gm.report_false(1, num_lendable=1)
    assert gm.recommend(0, 1).creditor_ids == (2,)
    gm.on_heartbeat(lendable_hb(1, 1, seq=2))  # no more room than at the false
    assert not gm.is_available(1)
    assert 1 not in gm.recommend(0, 1).creditor_ids
    gm.on_heartbeat(lendable_hb(1, 6, seq=3))
    assert gm.is_available(1)
    assert gm.recommend(0, 1).creditor_ids == (1, 2)
    assert gm.stats().num_false_replies == 1


def test_stale_or_missing_heartbeat_makes_instance_unavailable():
    clock = FakeClock()
    cfg = GManagerConfig(heartbeat_timeout_s=2.0, resort_every_heartbeats=1, resort_interval_s=0)
    gm = gm_with({0: 0, 1: 4, 2: 4}, config=cfg, clock=clock)
    clock.advance(1.5)
    gm.on_heartbeat(lendable_hb(2, 4, seq=2))
    clock.advance(1.0)  # 1 is 2.5 s old, 2 is 1.0 s old
    assert gm.stale_instance_ids() == [0, 1]
    assert gm.recommend(0, 1).creditor_ids == (2,)
    assert not gm.is_available(1) and not gm.is_available(7)
    gm.on_heartbeat(lendable_hb(1, 4, seq=2))
    assert gm.recommend(0, 1).creditor_ids == (1, 2)


def test_sorting_is_periodic_not_per_query():
    clock = FakeClock()
    cfg = GManagerConfig(resort_every_heartbeats=3, resort_interval_s=100.0)
    gm = gm_with({0: 0, 1: 4, 2: 6}, config=cfg, clock=clock)
    assert gm.recommend(0, 1).creditor_ids[0] == 2
    sorts = gm.stats().num_sorts
    for _ in range(50):
        gm.recommend(0, 1)
    assert gm.stats().num_sorts == sorts
    # A creditor that gained room is seen after the next sort, not before.
    gm.on_heartbeat(lendable_hb(0, 50, seq=2))
    assert 0 not in gm.recommend(1, 10).creditor_ids
    gm.on_heartbeat(lendable_hb(1, 4, seq=2))
    gm.on_heartbeat(lendable_hb(2, 6, seq=2))  # third heartbeat since the sort
    assert gm.recommend(1, 10).creditor_ids == (0,)
    assert gm.stats().num_sorts == sorts + 1
    clock.advance(100.0)
    gm.recommend(1, 1)
    assert gm.stats().num_sorts == sorts + 2


def test_split_when_no_single_creditor_can_hold_it():
    gm = gm_with({0: 0, 1: 3, 2: 5, 3: 2})
    rec = gm.recommend(0, 9)
    assert rec.creditor_ids == () and rec.split == ((2, 5), (1, 3), (3, 1))
    assert (gm.available(2), gm.available(1), gm.available(3)) == (0, 0, 1)
    assert gm.recommend(0, 2).is_empty
    assert gm.stats().num_splits == 1 and gm.stats().num_empty == 1
    no_split = gm_with({0: 0, 1: 3, 2: 5}, config=GManagerConfig(allow_split=False))
    assert no_split.recommend(0, 6).is_empty


def test_rejects_non_positive_requests():
    with pytest.raises(ValueError):
        gm_with({}).recommend(0, 0)


def test_ledger_rebuilt_after_gmanager_restart():
    c = LocalCluster(3, 8)
    c.borrower(0).borrow(2)
    c.borrower(1).borrow(3)
    before = c.gm.edges()
    assert sum(before.values()) == 5
    fresh = GManager(EAGER, clock=c.clock)
    fresh.rebuild(m.heartbeat() for m in c.managers.values())
    assert fresh.edges() == before
    assert fresh.free_blocks() == {i: m.num_free_blocks for i, m in c.managers.items()}
    fresh.check_integrity()


def test_forget_instance():
    c = LocalCluster(3, 8)
    c.borrower(0).borrow(2)
    creditor = next(iter(c.gm.edges()))[1]
    c.gm.forget_instance(creditor)
    assert c.gm.edges() == {}
    assert creditor not in c.gm.instance_ids()
    assert creditor not in c.gm.recommend(0, 1).creditor_ids


def test_plan_defragmentation_from_the_ledger():
    gm = gm_with({0: 1, 1: 1, 2: 1})
    for d, cr, n in [(0, 1, 2), (1, 2, 3), (2, 0, 4)]:
        gm.record_lend(d, cr, n)
    plan = gm.plan_defragmentation()
    assert [(s.instance_ids, s.num_blocks) for s in plan.swaps] == [((0, 1, 2), 2)]
    assert gm.plan_defragmentation(with_repatriation=True).repatriations != ()


def test_concurrent_queries_keep_reservations_exact():
    n_instances, per_thread, n_threads = 16, 300, 4
    gm = gm_with(dict.fromkeys(range(n_instances), 10_000), config=GManagerConfig())
    reserved = [0] * n_threads

    def worker(t: int) -> None:
        for k in range(per_thread):
            rec = gm.recommend(k % n_instances, 1 + k % 3)
            reserved[t] += rec.num_blocks if rec.creditor_ids else 0

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total_available = sum(gm.available(i) for i in range(n_instances))
    assert total_available == n_instances * 10_000 - sum(reserved)
    assert gm.stats().num_queries == per_thread * n_threads


def test_record_release_raises_the_estimate():
    m = RManager(1, 8)
    gm = gm_with({})
    gm.on_heartbeat(m.heartbeat())
    m.lend(LendRequest(0, 2))
    gm.record_lend(0, 1, 2)
    assert gm.available(1) == 2
    gm.record_release(0, 1, 2)
    assert gm.available(1) == 4 and gm.edges() == {}


def test_a_prefill_claim_is_granted_to_one_instance_at_a_time():
    gm = gm_with({0: 4, 1: 4, 2: 4})
    assert gm.prefill_way(0) is None
    assert gm.claim_prefill(0, (0, 5))
    assert gm.claim_prefill(0, (0, 5))  # held: granted again, still one claim
    assert gm.claim_prefill(0, (0, 9))  # the instance that holds one may start more
    assert not gm.claim_prefill(1, (0, 7))  # younger than the claim elsewhere
    assert not gm.claim_prefill(2, (0, 1))  # older too: two side by side run out together
    assert gm.prefill_way(1) == gm.prefill_way(2) == (0, 5) and gm.prefill_way(0) is None
    gm.check_integrity()


def test_syncing_prefill_claims_releases_them():
    gm = gm_with({0: 4, 1: 4})
    assert gm.claim_prefill(0, (0, 5)) and gm.claim_prefill(0, (0, 9))
    gm.sync_prefills(0, [(0, 9)])  # (0, 5)'s prompt is in
    assert gm.prefill_way(1) == (0, 9) and not gm.claim_prefill(1, (0, 7))
    gm.sync_prefills(0, [])
    assert gm.prefill_way(1) is None
    assert gm.claim_prefill(1, (0, 7)) and gm.prefill_way(0) == (0, 7)
    gm.check_integrity()


def test_forgetting_or_rebuilding_drops_prefill_claims():
    gm = gm_with({0: 4, 1: 4, 2: 4})
    assert gm.claim_prefill(0, (0, 5))
    gm.forget_instance(0)
    assert gm.prefill_way(1) is None and gm.claim_prefill(1, (0, 7))
    gm.rebuild([lendable_hb(i, 4, seq=2) for i in (1, 2)])  # as a restarted gManager: none
    assert gm.prefill_way(2) is None and gm.claim_prefill(2, (0, 8))


def test_recommendations_prefer_the_faster_memory_tier_then_the_debtors_own_host_pool() -> None:
    from infinite_llm.kvcache import RManager
    from infinite_llm.kvcache.tiers import Tier

    g = GManager(GManagerConfig(resort_every_heartbeats=1, resort_interval_s=0.0))
    pools = [
        RManager(0, 8, lending_cap=1.0),  # the debtor
        RManager(1, 30, lending_cap=1.0, tier=Tier.MEMORY),  # the most room, slowest
        RManager(2, 10, lending_cap=1.0, tier=Tier.HOST, host_of=3),
        RManager(3, 8, lending_cap=1.0),  # another model instance's device pool
        RManager(4, 9, lending_cap=1.0, tier=Tier.HOST, host_of=0),  # the debtor's host pool
    ]
    for rm in pools:
        g.on_heartbeat(rm.heartbeat())
    assert g.recommend(0, 4).creditor_ids == (3, 4, 2, 1)
    assert g.recommend(3, 4).creditor_ids == (0, 2, 4, 1)  # 2 is 3's own host pool
    assert g.recommend(0, 9).creditor_ids == (4, 2, 1)  # the device pools have no room for 9
