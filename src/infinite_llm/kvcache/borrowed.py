"""BorrowedBlocks: a debtor's record of the remote rBlocks it holds, per creditor.

The creditor is the authority over these blocks; this record only lets the debtor count
them, report them in its heartbeat and validate what it gives back. Not thread-safe: the
owning ``RManager`` takes its lock around every call.
"""

from __future__ import annotations

from infinite_llm.kvcache.block import BlockRef


class BorrowedBlocks:
    """creditor_id -> block ids (in the creditor's pool) held by one debtor instance."""

    __slots__ = ("_by_creditor", "_num_blocks", "instance_id")

    def __init__(self, instance_id: int) -> None:
        self.instance_id = instance_id
        self._by_creditor: dict[int, set[int]] = {}
        self._num_blocks = 0

    def __len__(self) -> int:
        return self._num_blocks

    def holds(self, refs: list[BlockRef]) -> bool:
        """Every ref is held, and none twice in ``refs``."""
        by_creditor = self._by_creditor
        return len(set(refs)) == len(refs) and all(
            r.block_id in by_creditor.get(r.instance_id, ()) for r in refs
        )

    def add(self, refs: list[BlockRef]) -> None:
        """Record newly granted refs; validates all before recording any."""
        seen: set[BlockRef] = set()
        for ref in refs:
            if ref.instance_id == self.instance_id:
                raise ValueError(f"{ref} is local to instance {self.instance_id}")
            if ref in seen or ref.block_id in self._by_creditor.get(ref.instance_id, ()):
                raise ValueError(f"{ref} is already recorded as borrowed")
            seen.add(ref)
        for ref in refs:
            self._by_creditor.setdefault(ref.instance_id, set()).add(ref.block_id)
        self._num_blocks += len(refs)

    def remove(self, refs: list[BlockRef]) -> None:
        """Forget refs given back; validates all before forgetting any."""
        if not self.holds(refs):
            raise ValueError(f"instance {self.instance_id} does not hold all of {refs}")
        for ref in refs:
            held = self._by_creditor[ref.instance_id]
            held.discard(ref.block_id)
            if not held:
                del self._by_creditor[ref.instance_id]
        self._num_blocks -= len(refs)

    def pop_creditor(self, creditor_id: int) -> list[BlockRef]:
        """Forget everything held from one creditor; returns it, sorted."""
        ids = sorted(self._by_creditor.pop(creditor_id, ()))
        self._num_blocks -= len(ids)
        return [BlockRef(creditor_id, b) for b in ids]

    def refs(self, creditor_id: int | None = None) -> list[BlockRef]:
        """Held refs (from one creditor, or all), sorted."""
        creditors = self._by_creditor if creditor_id is None else [creditor_id]
        return sorted(BlockRef(c, b) for c in creditors for b in self._by_creditor.get(c, ()))

    def counts(self) -> dict[int, int]:
        return {c: len(ids) for c, ids in self._by_creditor.items()}

    def check_integrity(self) -> None:
        iid = self.instance_id
        total = sum(len(ids) for ids in self._by_creditor.values())
        assert total == self._num_blocks, (
            f"instance {iid}: borrowed sets hold {total}, counter {self._num_blocks}"
        )
        assert iid not in self._by_creditor, f"instance {iid} borrowed from itself"
        assert all(self._by_creditor.values()), f"instance {iid}: empty borrowed set kept"
