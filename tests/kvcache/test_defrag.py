"""Debt-graph planning: cycles, swaps, repatriation, checked on a simulated cluster."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.kvcache import (
    CycleSwap,
    DebtLedger,
    DefragPlan,
    Move,
    debt_graph,
    find_cycle,
    plan_cycle_swaps,
    plan_defragmentation,
    plan_repatriation,
)


def simulate(plan: DefragPlan, own: dict, edges: dict, free: dict) -> tuple[dict, dict, dict]:
    """Apply a plan to counts: own[i] local rBlocks of i's requests, edges (debtor, creditor)
    -> rBlocks of the debtor's requests hosted by the creditor, free[i] free slots."""
    own, edges, free = dict(own), dict(edges), dict(free)
    for swap in plan.swaps:
        for d, c in swap.edges():
            assert edges.get((d, c), 0) >= swap.num_blocks, f"{swap} exceeds edge {d}->{c}"
            edges[(d, c)] -= swap.num_blocks  # c stops hosting them...
            own[d] = own.get(d, 0) + swap.num_blocks  # ...d hosts them (in slots it lent)
    for m in plan.repatriations:
        assert edges.get((m.debtor_id, m.creditor_id), 0) >= m.num_blocks
        assert free.get(m.debtor_id, 0) >= m.num_blocks, f"{m}: debtor lacks free blocks"
        edges[(m.debtor_id, m.creditor_id)] -= m.num_blocks
        own[m.debtor_id] = own.get(m.debtor_id, 0) + m.num_blocks
        free[m.debtor_id] -= m.num_blocks
        free[m.creditor_id] = free.get(m.creditor_id, 0) + m.num_blocks
    return own, {e: n for e, n in edges.items() if n}, free


def usage(own: dict, edges: dict, ids) -> dict[int, int]:
    """Slots occupied in each pool: own local rBlocks plus rBlocks hosted for debtors."""
    return {i: own.get(i, 0) + sum(n for (_, c), n in edges.items() if c == i) for i in ids}


def test_find_cycle():
    assert find_cycle({(0, 1): 2, (1, 2): 1}) is None
    assert find_cycle({(2, 0): 1, (0, 1): 2, (1, 2): 1}) == (0, 1, 2)
    assert find_cycle({(3, 4): 1, (4, 3): 5}) == (3, 4)
    assert debt_graph({(0, 1): 2, (0, 2): 1, (1, 0): 0}) == {0: {1: 2, 2: 1}}


def test_three_cycle_exact():
    edges = {(0, 1): 3, (1, 2): 2, (2, 0): 5}
    plan = plan_defragmentation(edges)
    assert plan.swaps == (CycleSwap((0, 1, 2), 2),)
    assert plan.swaps[0].moves() == (Move(0, 1, 2), Move(1, 2, 2), Move(2, 0, 2))
    assert plan.apply_to_edges(edges) == {(0, 1): 1, (2, 0): 3}
    assert plan.num_remote_blocks_removed == 6
    assert plan.usage_delta() == {}


def test_overlapping_cycles_exact():
    edges = {(0, 1): 4, (1, 0): 1, (1, 2): 2, (2, 0): 2}
    assert plan_cycle_swaps(edges) == (CycleSwap((0, 1), 1), CycleSwap((0, 1, 2), 2))
    assert DefragPlan(plan_cycle_swaps(edges)).apply_to_edges(edges) == {(0, 1): 1}


def test_acyclic_graph_gives_empty_plan():
    ledger = DebtLedger()
    ledger.record_lend(0, 1, 3)
    ledger.record_lend(1, 2, 3)
    plan = plan_defragmentation(ledger)
    assert plan.is_empty and plan.num_remote_blocks_removed == 0


def test_repatriation_exact_smallest_debts_first():
    edges = {(0, 1): 1, (0, 2): 3, (1, 2): 4, (2, 1): 1}
    moves = plan_repatriation({0: 2, 1: 10, 2: 0}, edges, reserve_blocks=0)
    # 2 can bring its debt home only with the slot 0's and 1's moves freed on it.
    assert moves == (Move(0, 1, 1), Move(0, 2, 1), Move(1, 2, 4), Move(2, 1, 1))
    assert plan_repatriation({0: 2}, edges, reserve_blocks=2) == ()
    plan = plan_defragmentation(edges, free_blocks={0: 2, 1: 10, 2: 0})
    assert plan.swaps == (CycleSwap((1, 2), 1),)
    assert plan.repatriations == (Move(0, 1, 1), Move(0, 2, 1), Move(1, 2, 3))
    assert plan.usage_delta() == {0: 2, 1: 2, 2: -4}


def test_apply_rejects_a_plan_that_does_not_fit():
    plan = DefragPlan((CycleSwap((0, 1), 3),))
    with pytest.raises(ValueError):
        plan.apply_to_edges({(0, 1): 3, (1, 0): 2})
    with pytest.raises(ValueError):
        plan.apply_to_edges({(0, 0): 1})


edge_maps = st.dictionaries(
    st.tuples(st.integers(0, 6), st.integers(0, 6)).filter(lambda e: e[0] != e[1]),
    st.integers(1, 6),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    edges=edge_maps,
    own=st.lists(st.integers(0, 5), min_size=7, max_size=7),
    free=st.lists(st.integers(0, 6), min_size=7, max_size=7),
)
def test_plans_keep_usage_and_strictly_reduce_remote_blocks(edges, own, free):
    ids = range(7)
    own_d, free_d = dict(enumerate(own)), dict(enumerate(free))
    swaps_only = plan_defragmentation(edges)
    own1, edges1, _ = simulate(swaps_only, own_d, edges, free_d)
    assert usage(own1, edges1, ids) == usage(own_d, edges, ids)  # swaps move nothing net
    assert find_cycle(edges1) is None
    assert edges1 == swaps_only.apply_to_edges(edges)
    before = sum(edges.values())
    if find_cycle(edges) is None:
        assert swaps_only.is_empty
    else:
        assert sum(edges1.values()) == before - swaps_only.num_remote_blocks_removed < before

    full = plan_defragmentation(edges, free_blocks=free_d)
    own2, edges2, free2 = simulate(full, own_d, edges, free_d)
    u0, u2 = usage(own_d, edges, ids), usage(own2, edges2, ids)
    assert sum(u2.values()) == sum(u0.values())
    assert {i: u2[i] - u0[i] for i in ids if u2[i] != u0[i]} == full.usage_delta()
    assert all(n >= 0 for n in free2.values())
    assert sum(edges2.values()) == before - full.num_remote_blocks_removed
    if not full.is_empty:
        assert sum(edges2.values()) < before
    # Nothing left that a debtor with free blocks could bring home.
    for (d, _), n in edges2.items():
        assert free2[d] == 0, (d, n)


def test_debts_to_a_slower_tier_move_to_a_faster_one_with_room() -> None:
    from infinite_llm.kvcache.defrag import Promotion, plan_promotions

    # debtor 0 owes memory instance 3 (tier 2) 5 rBlocks and host pool 2 (tier 1) 4; model
    # instance 1 (tier 0) can lend 6, host pool 4 (tier 1) 10
    edges = {(0, 3): 5, (0, 2): 4}
    tiers = {0: 0, 1: 0, 2: 1, 3: 2, 4: 1}
    lendable = {0: 9, 1: 6, 2: 0, 3: 0, 4: 10}
    assert plan_promotions(edges, tiers, lendable) == (
        Promotion(0, 2, 1, 4),  # the host debt up to the device tier
        Promotion(0, 3, 1, 2),  # what room is left there
        Promotion(0, 3, 4, 3),  # the rest of the memory debt to a host pool
    )
    plan = DefragPlan(promotions=plan_promotions(edges, tiers, lendable))
    assert plan.apply_to_edges(edges) == {(0, 1): 6, (0, 4): 3}
