"""Where cached prefixes live across the cluster: each instance advertises the content hashes
it can serve (``Advertised``), the gManager keeps them by hash (``PrefixIndex``).

An instance advertises a full rBlock's hash while it has the block: held by its requests
(``PrefixCache``), or free but cached in its pool (``FreeBlocks``); both may count the same
hash at once, hence a count per hash. The changes since the last heartbeat ride on it
(``Heartbeat.prefix_added`` / ``prefix_removed``), so a heartbeat costs nothing while nothing
changes.

The index is loosely coherent, like the rest of the gManager's view: an entry may be stale
(the block was evicted or lent since) and a restarted gManager starts empty and fills again as
blocks are cached. Both only cost a miss: the owning rManager answers for its blocks
(``RManager.lend`` of cached hashes) and a request computes what it did not get.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


class Advertised:
    """The hashes one instance serves, with the changes not yet reported."""

    __slots__ = ("_changed", "_count", "_reported")

    def __init__(self) -> None:
        self._count: Counter[bytes] = Counter()
        self._changed: set[bytes] = set()
        self._reported: set[bytes] = set()  # as the last drain left them

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._count

    def __len__(self) -> int:
        return len(self._count)

    def add(self, block_hash: bytes) -> None:
        if not self._count[block_hash]:
            self._changed.add(block_hash)
        self._count[block_hash] += 1

    def remove(self, block_hash: bytes) -> None:
        n = self._count[block_hash] - 1
        assert n >= 0, "a hash removed more often than added"
        if n:
            self._count[block_hash] = n
        else:
            del self._count[block_hash]
            self._changed.add(block_hash)

    def drain(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(added, removed) since the last drain (a hash that came and went is neither)."""
        count, reported = self._count, self._reported
        added = tuple(h for h in self._changed if h in count and h not in reported)
        removed = tuple(h for h in self._changed if h not in count and h in reported)
        reported.update(added)
        reported.difference_update(removed)
        self._changed.clear()
        return added, removed


class PrefixIndex:
    """content hash -> the instances that advertise it (the gManager's view)."""

    __slots__ = ("_where",)

    def __init__(self) -> None:
        self._where: dict[bytes, set[int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def apply(self, instance_id: int, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        for h in added:
            self._where.setdefault(h, set()).add(instance_id)
        for h in removed:
            where = self._where.get(h)
            if where is not None:
                where.discard(instance_id)
                if not where:
                    del self._where[h]

    def forget_instance(self, instance_id: int) -> None:
        for h in [h for h, where in self._where.items() if instance_id in where]:
            self.apply(instance_id, (), (h,))

    def reset(self) -> None:
        self._where.clear()

    def holders(self, hashes: Sequence[bytes]) -> list[tuple[int, ...]]:
        """Per hash from the first, the instances that advertise it (sorted), up to the first
        hash nobody advertises."""
        out = []
        for h in hashes:
            where = self._where.get(h)
            if not where:
                break
            out.append(tuple(sorted(where)))
        return out

    def matches(self, hashes: Sequence[bytes]) -> dict[int, int]:
        """Per instance advertising the first hash: how many leading hashes it advertises."""
        runs: dict[int, int] = {}
        alive: set[int] | None = None
        for n, h in enumerate(hashes):
            where = self._where.get(h, set())
            alive = set(where) if alive is None else alive & where
            if not alive:
                break
            for i in alive:
                runs[i] = n + 1
        return runs

    def num_hashes_of(self, instance_id: int) -> int:
        return sum(1 for where in self._where.values() if instance_id in where)
