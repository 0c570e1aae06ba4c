"""Executes defragmentation plans on in-process rManagers (the bookkeeping half of a move).

Each step returns ``Relocation(old, new)`` pairs: the caller copies every rBlock's data from
``old`` to ``new`` and points the request's ``BlockTable`` at ``new``. The relocations of one
cycle swap form a ring (each ``new`` is another relocation's ``old``), so read every source
before writing any destination. The requests involved must not run a step meanwhile. A
step validates everything before changing any manager, so a plan made from a stale ledger
fails with ValueError (swaps) or is skipped (repatriations) without half-applied state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.defrag import CycleSwap, DefragPlan, Move, Promotion
from infinite_llm.kvcache.messages import LendRequest, Release
from infinite_llm.kvcache.rmanager import RManager

# (debtor_id, creditor_id, num_blocks) -> which of the debtor's rBlocks on that creditor move
ChooseRefs = Callable[[int, int, int], list[BlockRef]]


class LedgerSink(Protocol):
    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None: ...

    def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Relocation:
    """One rBlock's data moves from ``old`` to ``new``; block tables must follow."""

    old: BlockRef
    new: BlockRef


def execute_swap(
    managers: Mapping[int, RManager], swap: CycleSwap, *, choose: ChooseRefs | None = None
) -> list[Relocation]:
    """Apply one cycle swap (see ``defrag``); every slot stays occupied."""
    ids, w = swap.instance_ids, swap.num_blocks
    chosen: list[list[BlockRef]] = []
    for debtor_id, creditor_id in swap.edges():
        refs = _choose(managers, debtor_id, creditor_id, w, choose)
        if not _consistent(managers, debtor_id, creditor_id, refs, w):
            raise ValueError(f"{debtor_id} does not hold {w} rBlocks of {creditor_id} to swap")
        chosen.append(refs)
    relocations = []
    k = len(ids)
    for i, debtor_id in enumerate(ids):
        creditor_id = ids[(i + 1) % k]
        managers[creditor_id].repossess(debtor_id, chosen[i])
        managers[debtor_id].record_returned(chosen[i])
        # Xi's rBlocks land in the slots Xi had lent to X(i-1): chosen[i-1], on Xi.
        relocations += [Relocation(o, n) for o, n in zip(chosen[i], chosen[i - 1], strict=True)]
    return relocations


def execute_repatriation(
    managers: Mapping[int, RManager], move: Move, *, choose: ChooseRefs | None = None
) -> list[Relocation] | None:
    """Bring ``move.num_blocks`` rBlocks home; None (nothing changed) if the debtor lacks
    free blocks now."""
    debtor, creditor = managers[move.debtor_id], managers[move.creditor_id]
    refs = _choose(managers, move.debtor_id, move.creditor_id, move.num_blocks, choose)
    if not _consistent(managers, move.debtor_id, move.creditor_id, refs, move.num_blocks):
        raise ValueError(f"{move} does not match what the managers hold")
    new = debtor.allocate(move.num_blocks)
    if new is None:
        return None
    debtor.record_returned(refs)  # first: reclaimed blocks may be lent straight back
    creditor.reclaim(Release(move.debtor_id, refs))
    return [Relocation(o, n) for o, n in zip(refs, new, strict=True)]


def execute_promotion(
    managers: Mapping[int, RManager], promotion: Promotion, *, choose: ChooseRefs | None = None
) -> list[Relocation] | None:
    """Move ``promotion.num_blocks`` of the debtor's rBlocks up a tier: the faster creditor
    lends that many slots (all or nothing; None, nothing changed, if it no longer can), the
    slower one takes its slots back."""
    d, src, dst = promotion.debtor_id, promotion.from_id, promotion.to_id
    n = promotion.num_blocks
    refs = _choose(managers, d, src, n, choose)
    if not _consistent(managers, d, src, refs, n):
        raise ValueError(f"{promotion} does not match what the managers hold")
    debtor = managers[d]
    reply = managers[dst].lend(LendRequest(d, n, debtor.new_lend_request(n).request_id))
    if not reply.granted:
        return None
    debtor.record_borrowed(reply.granted)
    debtor.record_returned(refs)
    managers[src].reclaim(Release(d, refs))
    return [Relocation(o, n) for o, n in zip(refs, reply.granted, strict=True)]


def execute_plan(
    managers: Mapping[int, RManager],
    plan: DefragPlan,
    *,
    gmanager: LedgerSink | None = None,
    choose: ChooseRefs | None = None,
) -> list[Relocation]:
    """Run every step of a plan in order; keeps the gManager's ledger in step if given."""
    relocations = []
    for swap in plan.swaps:
        relocations += execute_swap(managers, swap, choose=choose)
        if gmanager is not None:
            for d, c in swap.edges():
                gmanager.record_release(d, c, swap.num_blocks)
    for move in plan.repatriations:
        moved = execute_repatriation(managers, move, choose=choose)
        if moved is None:
            continue
        relocations += moved
        if gmanager is not None:
            gmanager.record_release(move.debtor_id, move.creditor_id, move.num_blocks)
    for promotion in plan.promotions:
        moved = execute_promotion(managers, promotion, choose=choose)
        if moved is None:
            continue
        relocations += moved
        if gmanager is not None:
            gmanager.record_lend(promotion.debtor_id, promotion.to_id, promotion.num_blocks)
            gmanager.record_release(promotion.debtor_id, promotion.from_id, promotion.num_blocks)
    return relocations


def _choose(
    managers: Mapping[int, RManager],
    debtor_id: int,
    creditor_id: int,
    num_blocks: int,
    choose: ChooseRefs | None,
) -> list[BlockRef]:
    if choose is not None:
        return list(choose(debtor_id, creditor_id, num_blocks))
    return managers[debtor_id].borrowed_refs(creditor_id)[:num_blocks]


def _consistent(
    managers: Mapping[int, RManager],
    debtor_id: int,
    creditor_id: int,
    refs: list[BlockRef],
    num_blocks: int,
) -> bool:
    """Both sides agree that ``refs`` are ``num_blocks`` distinct rBlocks lent debtor-ward."""
    lent = set(managers[creditor_id].lent_refs(debtor_id))
    return (
        len(refs) == num_blocks
        and lent.issuperset(refs)  # so every ref names the creditor
        and managers[debtor_id].has_borrowed(refs)  # and none is listed twice
    )
