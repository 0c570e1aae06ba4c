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
    """Per request: logical block index -> ``BlockRef`` (local or remote)."""

    __slots__ = ("_refs",)

    def __init__(self, refs: Iterable[BlockRef] = ()) -> None:
        self._refs: list[BlockRef] = list(refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __iter__(self) -> Iterator[BlockRef]:
        return iter(self._refs)

    def __getitem__(self, index: int) -> BlockRef:
        return self._refs[index]

    def __repr__(self) -> str:
        return f"BlockTable({self._refs!r})"

    def append(self, refs: Iterable[BlockRef]) -> None:
        self._refs.extend(refs)

    def replace(self, index: int, ref: BlockRef) -> BlockRef:
        """Point logical block ``index`` at ``ref`` (after a migration); returns the old ref."""
        old = self._refs[index]
        self._refs[index] = ref
        return old

    def clear(self) -> list[BlockRef]:
        """Drop every block; returns them so the caller can free them."""
        refs, self._refs = self._refs, []
        return refs

    def remove_instance(self, instance_id: int) -> list[BlockRef]:
        """Drop the blocks on ``instance_id`` (it died); returns them. The table is no longer
        contiguous, so the request must be recomputed."""
        gone = [ref for ref in self._refs if ref.instance_id == instance_id]
        self._refs = [ref for ref in self._refs if ref.instance_id != instance_id]
        return gone

    def refs(self) -> list[BlockRef]:
        return list(self._refs)

    def instance_ids(self) -> set[int]:
        return {ref.instance_id for ref in self._refs}

    def num_blocks_on(self, instance_id: int) -> int:
        return sum(1 for ref in self._refs if ref.instance_id == instance_id)
