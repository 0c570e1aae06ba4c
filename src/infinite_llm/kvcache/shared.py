"""SharedBlocks: reference counts of the rBlocks that several requests of one instance hold.

The samples of one parallel-sampling request (``n`` > 1) read the same rBlocks for their
prompt. The pool (local ``RManager``, or a creditor for a borrowed rBlock) holds each such
rBlock once, for the home instance; this record says how many of the home's requests hold it,
so that a free from one of them returns it to its pool only with the last holder::

    sample 0: [ (0,3) (0,4) (1,7) | (0,9) ]     (0,3) (0,4) (1,7): ref_cnt 3 (the prompt's
    sample 1: [ (0,3) (0,4) (1,7) | (0,5) ]     full rBlocks; (1,7) borrowed from instance 1)
    sample 2: [ (0,3) (0,4) (1,7) | (2,0) ]     each sample's own tail rBlock: ref_cnt 1

An rBlock held by one request is not recorded (``ref_cnt`` 1), so the record costs nothing
where nothing is shared. It lives in the scheduler's allocator, where frees happen: both
``LocalAllocator`` and ``Borrower`` pass every free through ``release``. Not thread-safe: only
the instance's scheduler (and, between steps, migration and failure handling) use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from infinite_llm.kvcache.block import BlockRef


class SharedBlocks:
    """``BlockRef`` -> ``ref_cnt`` for the rBlocks held by more than one request here."""

    __slots__ = ("_ref_cnt",)

    def __init__(self) -> None:
        self._ref_cnt: dict[BlockRef, int] = {}

    def __len__(self) -> int:
        """How many rBlocks are shared."""
        return len(self._ref_cnt)

    def ref_cnt(self, ref: BlockRef) -> int:
        """How many requests hold ``ref`` (1 when it is not shared; the caller knows it is held)."""
        return self._ref_cnt.get(ref, 1)

    def ref_cnts(self) -> dict[BlockRef, int]:
        """Every shared rBlock's ``ref_cnt`` (each at least 2)."""
        return dict(self._ref_cnt)

    def share(self, refs: Iterable[BlockRef]) -> None:
        """One more request now holds each of ``refs`` (each already held by at least one)."""
        refs = list(refs)
        if len(set(refs)) != len(refs):
            raise ValueError(f"duplicate refs shared: {refs}")
        for ref in refs:
            self._ref_cnt[ref] = self._ref_cnt.get(ref, 1) + 1

    def release(self, refs: Iterable[BlockRef]) -> list[BlockRef]:
        """One holder lets go of each of ``refs``; returns those it held last (to be freed),
        in the order given."""
        last = []
        for ref in refs:
            count = self._ref_cnt.get(ref, 1) - 1
            if count > 1:
                self._ref_cnt[ref] = count
            elif count == 1:
                del self._ref_cnt[ref]
            else:
                last.append(ref)
        return last

    def relocate(self, moves: Mapping[BlockRef, BlockRef]) -> None:
        """Shared rBlocks whose data moved (defragmentation) keep their count at the new ref.
        Every holder's block table follows the same moves (``Instance.relocate``)."""
        moved = {moves[ref]: n for ref, n in self._ref_cnt.items() if ref in moves}
        for ref in moves:
            self._ref_cnt.pop(ref, None)
        self._ref_cnt.update(moved)


def tail_first(refs: Iterable[BlockRef]) -> list[BlockRef]:
    """A request's rBlocks in the order its allocator frees them: the last first. The pool
    evicts cached rBlocks least recently freed first (``kvcache.free_blocks``), and a cached prefix
    is found from its head: evicting a head first would strand the rest (vLLM frees in reverse
    too)."""
    return list(refs)[::-1]


def check_holders(tables: Iterable[Iterable[BlockRef]], ref_cnts: Mapping[BlockRef, int]) -> None:
    """Raise AssertionError unless every rBlock in ``tables`` (the block tables of one
    instance's requests) is held by exactly its ``ref_cnt`` of them (``ref_cnts``: a
    ``SharedBlocks.ref_cnts()``; 1 when missing), and no count is recorded for an rBlock no
    request holds (it would keep the rBlock from its pool forever)."""
    held = Counter(ref for table in tables for ref in table)
    for ref, n in held.items():
        want = ref_cnts.get(ref, 1)
        assert n == want, f"{ref} is held by {n} requests, ref_cnt {want}" + (
            " (an rBlock is held by two requests)" if want == 1 else ""
        )
    stale = sorted(ref for ref in ref_cnts if ref not in held)
    assert not stale, f"shared rBlocks that no request holds: {stale}"
