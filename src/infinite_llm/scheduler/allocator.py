"""What a scheduler needs of the memory under it: its home pool's rBlocks, borrowing, and the
gManager's prefill claims. ``LocalAllocator`` serves a cluster that does not borrow; a
``kvcache.borrow.Borrower`` one that does."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.prefix import PrefixCache
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.shared import SharedBlocks, tail_first
from infinite_llm.scheduler.order import Rank


class BlockAllocator(Protocol):
    """Where a request's rBlocks come from: the local RManager, or one that also borrows.

    ``shared`` counts the rBlocks several requests here hold (the samples of one request share
    their prompt's; requests with a common prefix share its rBlocks): ``free`` drops one holder
    of each rBlock and returns to its pool only those whose last holder it was, cached when
    ``prefix`` (the prefix cache, None when off) named them."""

    shared: SharedBlocks
    prefix: PrefixCache | None

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        """All ``num_blocks`` or None."""
        ...

    def free(self, refs: Iterable[BlockRef]) -> None:
        """One holder lets go of each rBlock; those it held last go back to their pools."""
        ...

    @property
    def num_blocks(self) -> int:
        """rBlocks of the home pool."""
        ...

    @property
    def num_free_blocks(self) -> int:
        """Free rBlocks of the home pool."""
        ...

    def reserve(self, num_blocks: int) -> None:
        """How many free rBlocks the running requests are about to need (kept from lending)."""
        ...

    def can_borrow(self, num_blocks: int) -> bool:
        """Whether the cluster looks able to lend ``num_blocks`` now (a hint; holds nothing)."""
        ...

    def claim_prefill(self, rank: Rank) -> bool:
        """Whether the request of ``rank``, longer than the home pool, may start prefilling:
        granted and held while no other instance holds a claim (``GManager.claim_prefill``)."""
        ...

    def sync_prefills(self, ranks: Collection[Rank]) -> None:
        """The claims this instance holds are exactly ``ranks``."""
        ...

    def prefill_way(self) -> Rank | None:
        """The oldest claim another instance holds now (None: none)."""
        ...


class LocalAllocator:
    """A scheduler's rBlocks from its home pool alone (a cluster that does not borrow): the
    ``RManager``'s allocate, free and reserve. It borrows nothing and, admitting nothing longer
    than its pool, competes with no other instance's prefill: every claim holds, none elsewhere."""

    def __init__(self, rmanager: RManager, *, prefix_block_size: int | None = None) -> None:
        self.rmanager = rmanager
        self.shared = SharedBlocks()
        self.prefix = (
            PrefixCache(rmanager, prefix_block_size) if prefix_block_size is not None else None
        )

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        return self.rmanager.allocate(num_blocks)

    def free(self, refs: Iterable[BlockRef]) -> None:
        last = self.shared.release(tail_first(refs))
        self.rmanager.free(last, self.prefix.forget(last) if self.prefix else None)

    @property
    def num_blocks(self) -> int:
        return self.rmanager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.rmanager.num_free_blocks

    def reserve(self, num_blocks: int) -> None:
        self.rmanager.reserve(num_blocks)

    def can_borrow(self, num_blocks: int) -> bool:
        return num_blocks <= 0

    def claim_prefill(self, rank: Rank) -> bool:
        return True

    def sync_prefills(self, ranks: Collection[Rank]) -> None:
        pass

    def prefill_way(self) -> Rank | None:
        return None
