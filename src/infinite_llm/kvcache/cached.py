"""CachedBlocks: the free rBlocks of one pool that still hold a full rBlock's KV, by content hash.

When the last request holding a full rBlock lets it go (``RManager.free``, or a debtor's
``Release`` of a lent one), its KV stays where it is and the block is kept here, keyed by
its chained content hash (``kvcache.prefix``), instead of going back to the free heap. It is
still free memory: counted free, lendable, and taken (evicted, least recently freed first)
when the pool has no plain free block left. Until then a request whose prompt starts with the
same tokens takes it back (``take``) and skips computing them: the prefix cache (vLLM keeps
its free blocks in one LRU queue the same way).

Not thread-safe: the owning ``RManager`` calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict


class CachedBlocks:
    """block id -> content hash for the free blocks that keep their KV, oldest first."""

    __slots__ = ("_block_of", "_hash_of")

    def __init__(self) -> None:
        self._hash_of: OrderedDict[int, bytes] = OrderedDict()
        self._block_of: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._hash_of)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._block_of

    def add(self, block_id: int, block_hash: bytes) -> bool:
        """Keep ``block_id``'s KV under ``block_hash``, most recently freed; False (kept
        nothing) when another free block already holds that content."""
        if block_hash in self._block_of:
            return False
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        return True

    def take(self, block_hash: bytes) -> int | None:
        """The free block holding ``block_hash``'s KV, no longer cached (None: none here)."""
        block_id = self._block_of.pop(block_hash, None)
        if block_id is not None:
            del self._hash_of[block_id]
        return block_id

    def evict(self) -> tuple[int, bytes]:
        """The least recently freed block and the hash it held, forgotten (it is overwritten)."""
        block_id, block_hash = self._hash_of.popitem(last=False)
        del self._block_of[block_hash]
        return block_id, block_hash

    def hashes(self) -> list[bytes]:
        return list(self._block_of)

    def block_ids(self) -> list[int]:
        return list(self._hash_of)

    def check_integrity(self) -> None:
        assert len(self._hash_of) == len(self._block_of), "cached blocks: maps differ in size"
        for block_id, block_hash in self._hash_of.items():
            assert self._block_of.get(block_hash) == block_id, (
                f"cached block {block_id}: its hash maps to {self._block_of.get(block_hash)}"
            )
