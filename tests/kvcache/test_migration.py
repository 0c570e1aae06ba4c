"""Executing defragmentation plans on real in-process rManagers and block tables."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache import (
    BlockRef,
    BlockTable,
    CycleSwap,
    DefragPlan,
    LendRequest,
    Move,
    Relocation,
    RManager,
    execute_plan,
    plan_defragmentation,
)
from infinite_llm.kvcache.migration import execute_repatriation

from .conftest import assert_pairs_consistent, real_edges


def lend(ms: dict[int, RManager], creditor: int, debtor: int, n: int) -> list[BlockRef]:
    granted = ms[creditor].lend(LendRequest(debtor, n)).granted
    assert granted is not None
    ms[debtor].record_borrowed(granted)
    return granted


def pool_usage(ms: dict[int, RManager]) -> dict[int, int]:
    return {i: m.num_used_blocks + m.num_lent_blocks for i, m in ms.items()}


def test_cycle_swap_exact():
    ms = {i: RManager(i, 8, lending_cap=1.0) for i in range(3)}
    tables = {  # request of instance i -> its block table (all remote)
        0: BlockTable(lend(ms, 1, 0, 2)),  # (1,0) (1,1)
        1: BlockTable(lend(ms, 2, 1, 2)),  # (2,0) (2,1)
        2: BlockTable(lend(ms, 0, 2, 2)),  # (0,0) (0,1)
    }
    usage = pool_usage(ms)
    plan = plan_defragmentation(real_edges(ms.values()))
    assert plan.swaps == (CycleSwap((0, 1, 2), 2),)
    relocations = execute_plan(ms, plan)
    r = BlockRef
    assert relocations == [
        Relocation(r(1, 0), r(0, 0)),
        Relocation(r(1, 1), r(0, 1)),
        Relocation(r(2, 0), r(1, 0)),
        Relocation(r(2, 1), r(1, 1)),
        Relocation(r(0, 0), r(2, 0)),
        Relocation(r(0, 1), r(2, 1)),
    ]
    where = {rel.old: rel.new for rel in relocations}
    for table in tables.values():
        for k, ref in enumerate(table):
            table.replace(k, where[ref])
    assert {i: t.instance_ids() for i, t in tables.items()} == {0: {0}, 1: {1}, 2: {2}}
    assert pool_usage(ms) == usage
    for i, m in ms.items():
        assert (m.num_lent_blocks, m.num_borrowed_blocks, m.num_used_blocks) == (0, 0, 2)
        m.free(tables[i].clear())
        assert m.num_free_blocks == 8
        m.check_integrity()


def test_stale_swap_fails_without_touching_anything():
    ms = {i: RManager(i, 8, lending_cap=1.0) for i in range(2)}
    lend(ms, 1, 0, 2)
    lend(ms, 0, 1, 1)
    before = [m.heartbeat() for m in ms.values()]
    with pytest.raises(ValueError):
        execute_plan(ms, DefragPlan((CycleSwap((0, 1), 2),)))
    after = [m.heartbeat() for m in ms.values()]
    assert [(h.lent_to, h.borrowed_from, h.num_used) for h in before] == [
        (h.lent_to, h.borrowed_from, h.num_used) for h in after
    ]


def test_repatriation_exact_and_skipped_when_no_room():
    ms = {i: RManager(i, 8, lending_cap=1.0) for i in range(2)}
    ms[0].allocate(3)
    lend(ms, 1, 0, 3)
    plan = plan_defragmentation(real_edges(ms.values()), free_blocks={0: 5, 1: 5})
    assert plan.repatriations == (Move(0, 1, 3),)
    relocations = execute_plan(ms, plan)
    assert relocations == [Relocation(BlockRef(1, b), BlockRef(0, 3 + b)) for b in range(3)]
    assert (ms[0].num_used_blocks, ms[0].num_borrowed_blocks, ms[1].num_lent_blocks) == (6, 0, 0)
    lend(ms, 1, 0, 3)
    ms[0].allocate(2)  # the plan said 5 free; now there are none
    assert execute_repatriation(ms, Move(0, 1, 3)) is None
    assert ms[0].num_borrowed_blocks == 3
    assert_pairs_consistent(ms.values())
