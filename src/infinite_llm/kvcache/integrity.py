"""The cluster-wide invariants, over one consistent view of every instance.

Every cluster (in-process, Ray, the simulator) checks the same things after a heartbeat
round: no rBlock is held by two requests unless its instance counts them as sharing it (the
samples of one request share their prompt's rBlocks, ``kvcache.shared``); each manager's used + lent equals the rBlocks the
requests hold on its pool; borrowed and lent counts equal what the block tables say; the
counts add up to the pool; and the gManager's ledger equals what creditors have lent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.ledger import Edge
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.shared import check_holders


@dataclass(frozen=True)
class PoolState:
    """What ``check_cluster`` reads of an instance; a Ray ``InstanceSnapshot`` has the same fields."""

    instance_id: int
    num_blocks: int
    num_free: int
    num_used: int
    num_lent: int
    num_borrowed: int
    lent_counts: Mapping[int, int]
    block_tables: Mapping[str, Sequence[BlockRef]]  # the instance's own requests
    ref_cnts: Mapping[BlockRef, int]  # rBlocks several of them hold (``SharedBlocks.ref_cnts``)


def pool_state(
    rmanager: RManager,
    block_tables: Iterable[tuple[str, Iterable[BlockRef]]],
    ref_cnts: Mapping[BlockRef, int],
) -> PoolState:
    """A live instance's view (after ``rmanager.check_integrity()`` has passed)."""
    return PoolState(
        rmanager.instance_id,
        rmanager.num_blocks,
        rmanager.num_free_blocks,
        rmanager.num_used_blocks,
        rmanager.num_lent_blocks,
        rmanager.num_borrowed_blocks,
        rmanager.lent_counts(),
        {rid: list(refs) for rid, refs in block_tables},
        dict(ref_cnts),
    )


def pool_counts(rmanager: RManager) -> dict[str, int]:
    """An instance's rBlock counts as every cluster's ``stats()`` reports them (``cached``: the
    free ones that keep a prefix's KV, counted in ``free`` too)."""
    return {
        "instance_id": rmanager.instance_id,
        "num_blocks": rmanager.num_blocks,
        "free": rmanager.num_free_blocks,
        "used": rmanager.num_used_blocks,
        "lent": rmanager.num_lent_blocks,
        "borrowed": rmanager.num_borrowed_blocks,
        "cached": rmanager.num_cached_blocks,
    }


def check_cluster(pools: Sequence[PoolState | Any], edges: Mapping[Edge, int]) -> None:
    """Raise AssertionError unless block tables, managers and the ledger all agree."""
    ids = {p.instance_id for p in pools}
    held: dict[int, list[int]] = {i: [] for i in ids}
    borrowed = dict.fromkeys(ids, 0)
    lent = dict.fromkeys(ids, 0)
    for p in pools:
        i = p.instance_id
        check_holders(p.block_tables.values(), p.ref_cnts)
        distinct = {ref for refs in p.block_tables.values() for ref in refs}  # shared ones once
        for ref in sorted(distinct):
            assert ref.instance_id in held, (
                f"instance {i} holds an rBlock on dead instance {ref.instance_id}"
            )
            held[ref.instance_id].append(ref.block_id)
            if ref.instance_id != i:
                borrowed[i] += 1
                lent[ref.instance_id] += 1
    for p in pools:
        i, blocks = p.instance_id, held[p.instance_id]
        assert len(blocks) == len(set(blocks)), (
            f"instance {i}: an rBlock is held by requests of two instances"
        )
        assert len(blocks) == p.num_used + p.num_lent, (
            f"instance {i}: requests hold {len(blocks)} of its rBlocks, "
            f"its manager counts {p.num_used} used + {p.num_lent} lent"
        )
        assert borrowed[i] == p.num_borrowed, (
            f"instance {i}: requests hold {borrowed[i]} remote rBlocks, manager records {p.num_borrowed}"
        )
        assert lent[i] == p.num_lent, f"instance {i}: lent {p.num_lent}, in use remotely {lent[i]}"
        assert p.num_free + p.num_used + p.num_lent == p.num_blocks, (
            f"instance {i}: counts do not add up"
        )
    ledger = {pair: n for pair, n in edges.items() if n}
    actual = {(d, p.instance_id): n for p in pools for d, n in p.lent_counts.items() if n}
    assert ledger == actual, f"ledger {ledger} != what creditors have lent {actual}"
