"""FreeBlocks: the free rBlocks of one pool, plain and cached.

A plain free block sits in a heap (lowest id handed out first). A *cached* one still holds a
full rBlock's KV and is kept under its chained content hash (``kvcache.prefix``): when the last
request holding it let go (``RManager.free``, or a debtor's ``Release`` of a lent one), its KV
stayed where it is. Both are free memory: counted free, lendable, and taken when needed, plain
ones first, then cached ones least recently freed first (evicted: their hash is forgotten).
Until then a request whose prompt starts with the same tokens takes a cached block back
(``take_cached``) and skips computing them: the prefix cache (vLLM keeps its free blocks in one
LRU queue the same way).

Every cached hash is advertised (``kvcache.prefix_index.Advertised``) while cached here.
Not thread-safe: the owning ``RManager`` calls it under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable

from infinite_llm.kvcache.prefix_index import Advertised


class FreeBlocks:
    """The free block ids of one pool: a heap of plain ones, an LRU of cached ones."""

    __slots__ = ("_advertised", "_block_of", "_hash_of", "_heap")

    def __init__(self, num_blocks: int, advertised: Advertised) -> None:
        # Every plain free block is in the heap exactly once, so no lazy deletion is needed:
        # blocks leave it only by heappop and come back only by heappush.
        self._heap = list(range(num_blocks))
        self._hash_of: OrderedDict[int, bytes] = OrderedDict()  # cached, oldest first
        self._block_of: dict[bytes, int] = {}
        self._advertised = advertised

    def __len__(self) -> int:
        return len(self._heap) + len(self._hash_of)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def take(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` free blocks, plain ones first, then cached ones least recently freed
        first; None (nothing taken) when there are fewer."""
        if num_blocks > len(self):
            return None
        heap = self._heap
        block_ids = [heapq.heappop(heap) for _ in range(min(num_blocks, len(heap)))]
        while len(block_ids) < num_blocks:
            block_id, block_hash = self._hash_of.popitem(last=False)
            del self._block_of[block_hash]
            self._advertised.remove(block_hash)
            block_ids.append(block_id)
        return block_ids

    def take_cached(self, hashes: Iterable[bytes], limit: int) -> list[int]:
        """The cached blocks of the leading run of ``hashes`` found here, at most ``limit``."""
        block_ids = []
        for block_hash in hashes:
            if len(block_ids) >= limit:
                break
            block_id = self._block_of.pop(block_hash, None)
            if block_id is None:
                break
            del self._hash_of[block_id]
            self._advertised.remove(block_hash)
            block_ids.append(block_id)
        return block_ids

    def give_back(self, block_ids: list[int], hashes: Iterable[bytes | None] | None) -> None:
        """``block_ids`` are free again; those with a hash (one per block, or None) keep their
        KV cached, most recently freed last, unless another block here already holds it."""
        names = list(hashes) if hashes is not None else [None] * len(block_ids)
        if len(names) != len(block_ids):
            raise ValueError(f"{len(names)} hashes for {len(block_ids)} rBlocks")
        for block_id, block_hash in zip(block_ids, names, strict=True):
            if block_hash is not None and block_hash not in self._block_of:
                self._hash_of[block_id] = block_hash
                self._block_of[block_hash] = block_id
                self._advertised.add(block_hash)
            else:
                heapq.heappush(self._heap, block_id)

    def cached_block_ids(self) -> list[int]:
        """The cached blocks, least recently freed first."""
        return list(self._hash_of)

    def check_integrity(self, is_free: Callable[[int], bool], who: str) -> None:
        """Raise AssertionError unless every block here is free (``is_free``) and listed once,
        the cache's two maps agree, and every cached hash is advertised."""
        heap, cached = self._heap, list(self._hash_of)
        assert len(set(heap)) == len(heap), f"{who}: a block is free twice"
        assert not set(cached) & set(heap), f"{who}: a cached block is in the heap"
        assert all(is_free(b) for b in heap + cached), f"{who}: a free-listed block is not FREE"
        assert len(self._hash_of) == len(self._block_of), f"{who}: cached maps differ in size"
        for block_id, block_hash in self._hash_of.items():
            assert self._block_of.get(block_hash) == block_id, f"{who}: cached block {block_id}"
            assert block_hash in self._advertised, f"{who}: a cached hash is not advertised"
