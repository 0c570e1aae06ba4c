"""rBlocks: the unit of KV-cache memory, addressed anywhere in the cluster.

An rBlock holds ``block_size`` tokens of K and V for every layer in one instance's pool.
A request's ``BlockTable`` maps its logical block index to a ``BlockRef`` that may name
any instance: local blocks and borrowed (remote) blocks are addressed the same way.

    logical:   [ 0 ][ 1 ][ 2 ][ 3 ]          tokens 0..4*block_size-1
    BlockRef:  (0,7)(0,8)(2,3)(1,0)          instance 0 is home; 2 and 1 are creditors
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class BlockRef:
    """Address of one physical rBlock: which instance's pool, which block in it."""

    instance_id: int
    block_id: int


class BlockTable:
    """Per request: logical block index -> ``BlockRef`` (local or remote).

    It also keeps, per instance, that instance's block ids and their logical indices in logical
    order (``on``): what a step's attention reads for each shard. The view persists across
    steps and grows with ``append`` (a decode step adds one rBlock every ``block_size`` tokens);
    only the rare rewrites (a migration's ``replace``, a death's ``remove_instance``) rebuild
    it, so a step's plan slices it instead of walking every ref.
    """

    __slots__ = ("_by_instance", "_refs")

    def __init__(self, refs: Iterable[BlockRef] = ()) -> None:
        self._refs: list[BlockRef] = []
        self._by_instance: dict[int, tuple[list[int], list[int]]] = {}
        self.append(refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __iter__(self) -> Iterator[BlockRef]:
        return iter(self._refs)

    def __getitem__(self, index: int) -> BlockRef:
        return self._refs[index]

    def __repr__(self) -> str:
        return f"BlockTable({self._refs!r})"

    def append(self, refs: Iterable[BlockRef]) -> None:
        by_instance = self._by_instance
        for ref in refs:
            entry = by_instance.get(ref.instance_id)
            if entry is None:
                entry = by_instance[ref.instance_id] = ([], [])
            entry[0].append(ref.block_id)
            entry[1].append(len(self._refs))
            self._refs.append(ref)

    def replace(self, index: int, ref: BlockRef) -> BlockRef:
        """Point logical block ``index`` at ``ref`` (after a migration); returns the old ref."""
        old = self._refs[index]
        self._refs[index] = ref
        self._rebuild()
        return old

    def clear(self) -> list[BlockRef]:
        """Drop every block; returns them so the caller can free them."""
        refs, self._refs = self._refs, []
        self._by_instance = {}
        return refs

    def remove_instance(self, instance_id: int) -> list[BlockRef]:
        """Drop the blocks on ``instance_id`` (it died); returns them. The table is no longer
        contiguous, so the request must be recomputed."""
        gone = [ref for ref in self._refs if ref.instance_id == instance_id]
        self._refs = [ref for ref in self._refs if ref.instance_id != instance_id]
        self._rebuild()
        return gone

    def _rebuild(self) -> None:
        refs, self._refs, self._by_instance = self._refs, [], {}
        self.append(refs)

    def refs(self) -> list[BlockRef]:
        return list(self._refs)

    def on(self, instance_id: int) -> tuple[list[int], list[int]]:
        """(block ids, their logical indices) of the blocks on ``instance_id``, in logical
        order: the table's own lists, not copies (read them, do not change them)."""
        return self._by_instance.get(instance_id, ([], []))

    def by_instance(self) -> Iterator[tuple[int, tuple[list[int], list[int]]]]:
        """``(instance, on(instance))`` for each instance holding blocks, in the order of their
        first block in the table."""
        return iter(self._by_instance.items())

    def instance_ids(self) -> set[int]:
        return set(self._by_instance)

    def num_blocks_on(self, instance_id: int) -> int:
        return len(self.on(instance_id)[0])
