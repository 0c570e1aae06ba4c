"""LentBlocks: a creditor's record of the rBlocks of its pool lent to debtors, per debtor.

The creditor is the authority over these blocks (``BorrowedBlocks`` is the debtor's side of
the same ledger). Not thread-safe: the owning ``RManager`` takes its lock around every call.
"""

from __future__ import annotations

from collections.abc import Iterable

from infinite_llm.kvcache.block import BlockRef


class LentBlocks:
    """debtor_id -> block ids lent to it, and each lent block's debtor."""

    __slots__ = ("_debtor_of", "_to", "instance_id")

    def __init__(self, instance_id: int) -> None:
        self.instance_id = instance_id
        self._to: dict[int, set[int]] = {}  # debtor_id -> block ids lent to it
        self._debtor_of: dict[int, int] = {}  # lent block id -> debtor_id

    def __len__(self) -> int:
        return len(self._debtor_of)

    def add(self, debtor_id: int, block_ids: Iterable[int]) -> None:
        block_ids = list(block_ids)
        if block_ids:
            self._to.setdefault(debtor_id, set()).update(block_ids)
        for b in block_ids:
            self._debtor_of[b] = debtor_id

    def check_lent_to(self, debtor_id: int, block_ids: Iterable[int]) -> None:
        """ValueError unless every block is lent to ``debtor_id``."""
        for b in block_ids:
            if self._debtor_of.get(b) != debtor_id:
                raise ValueError(
                    f"{BlockRef(self.instance_id, b)} is not lent to instance {debtor_id}"
                )

    def remove(self, debtor_id: int, block_ids: list[int]) -> None:
        """Forget blocks lent to ``debtor_id`` (checked by ``check_lent_to``)."""
        if not block_ids:
            return
        lent = self._to[debtor_id]
        for b in block_ids:
            lent.discard(b)
            del self._debtor_of[b]
        if not lent:
            del self._to[debtor_id]

    def of(self, debtor_id: int | None = None) -> list[int]:
        """Block ids lent to ``debtor_id`` (to anyone: None), sorted."""
        return sorted(self._debtor_of if debtor_id is None else self._to.get(debtor_id, ()))

    def debtor_of(self, block_id: int) -> int | None:
        return self._debtor_of.get(block_id)

    def counts(self) -> dict[int, int]:
        """debtor_id -> number of blocks lent to it."""
        return {d: len(ids) for d, ids in self._to.items()}

    def check_integrity(self) -> None:
        iid = self.instance_id
        per_debtor = sum(len(ids) for ids in self._to.values())
        assert per_debtor == len(self._debtor_of), (
            f"instance {iid}: lent-per-debtor sums to {per_debtor}, not {len(self._debtor_of)}"
        )
        for debtor_id, ids in self._to.items():
            assert ids, f"instance {iid}: empty lent set kept for debtor {debtor_id}"
            assert debtor_id != iid, f"instance {iid} lent to itself"
            for b in ids:
                assert self._debtor_of.get(b) == debtor_id, (
                    f"instance {iid}: block {b} lent to {debtor_id} is not tracked so"
                )
