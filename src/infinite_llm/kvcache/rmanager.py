"""RManager: owner of one instance's physical rBlocks (allocate, free, lend, reclaim, heartbeat).

Every physical block ``0..num_blocks-1`` of the instance's pool is in exactly one state::

    FREE  -> in ``FreeBlocks``: plain (lowest id handed out first), or cached: it keeps a
             full rBlock's KV under its content hash (the prefix cache) until no plain one
             is left and it is taken, least recently freed first
    USED  -> allocated for one of this instance's own requests
    LENT  -> allocated on behalf of a remote debtor (``lend``), until it is released

Blocks this instance *borrowed* from others live in other pools; the rManager only keeps
their refs per creditor (``record_borrowed``/``record_returned``) so its counts and heartbeat
cover them. The creditor is the authority over its blocks: a lend is answered from the local
free pool only, first come first served and all-or-nothing, and never by borrowing in turn
(no borrowing chains). A cap limits how much of the pool may be lent at once.

Thread-safe: a creditor serves lend requests from other threads while its engine allocates.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.borrowed import BorrowedBlocks
from infinite_llm.kvcache.free_blocks import FreeBlocks
from infinite_llm.kvcache.lent import LentBlocks
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.prefix_index import Advertised
from infinite_llm.kvcache.tiers import Tier

_FREE, _USED, _LENT = 0, 1, 2


@dataclass(frozen=True)
class RManagerConfig:
    """How one instance manages its pool (the pool size is a run-time fact, passed apart).

    ``lending_cap`` is the largest fraction of the pool lent to remote debtors at once;
    0 disables lending (every block stays for the instance's own requests).
    """

    lending_cap: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.lending_cap <= 1.0:
            raise ValueError(f"lending_cap must be in [0, 1], got {self.lending_cap}")

    def max_lent_blocks(self, num_blocks: int) -> int:
        # The epsilon keeps 0.29 * 100 from flooring to 28.
        return math.floor(self.lending_cap * num_blocks + 1e-9)


class RManager:
    """Owns one instance's physical rBlocks ``0..num_blocks-1``."""

    def __init__(
        self,
        instance_id: int,
        num_blocks: int,
        *,
        lending_cap: float = 0.5,
        tier: Tier = Tier.DEVICE,
        host_of: int | None = None,
    ) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.instance_id = instance_id
        self.tier = tier  # the pool's memory tier (``kvcache.tiers``)
        self.host_of = host_of  # a host pool's model instance
        self.config = RManagerConfig(lending_cap=lending_cap)
        self._num_blocks = num_blocks
        self._max_lent = self.config.max_lent_blocks(num_blocks)
        self._lock = threading.Lock()
        self._state = [_FREE] * num_blocks
        self._advertised = Advertised()  # hashes cached here or held by own requests
        self._free = FreeBlocks(num_blocks, self._advertised)
        self._num_used = 0
        self._lent = LentBlocks(instance_id)
        self._borrowed = BorrowedBlocks(instance_id)
        self._reserve = 0  # free blocks kept for own running requests (``reserve``)
        self._heartbeat_seq = itertools.count(1)
        self._lend_request_seq = itertools.count(1)

    @classmethod
    def from_config(cls, instance_id: int, num_blocks: int, config: RManagerConfig) -> RManager:
        return cls(instance_id, num_blocks, lending_cap=config.lending_cap)

    def __repr__(self) -> str:
        return (
            f"RManager(id={self.instance_id}, free={self.num_free_blocks}, "
            f"used={self.num_used_blocks}, lent={self.num_lent_blocks}, "
            f"borrowed={self.num_borrowed_blocks})"
        )

    # ---- counts -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, the cached ones included (they are taken when needed)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that keep a prefix's KV."""
        return self._free.num_cached

    @property
    def num_used_blocks(self) -> int:
        """Local blocks allocated for this instance's own requests."""
        return self._num_used

    @property
    def num_lent_blocks(self) -> int:
        return len(self._lent)

    @property
    def num_borrowed_blocks(self) -> int:
        """Remote blocks this instance currently holds as a debtor."""
        return len(self._borrowed)

    @property
    def max_lent_blocks(self) -> int:
        return self._max_lent

    @property
    def num_lendable_blocks(self) -> int:
        """Free blocks this instance would lend right now under its cap."""
        with self._lock:
            return self._lendable()

    def _lendable(self) -> int:
        free = len(self._free) - self._reserve
        return max(0, min(free, self.max_lent_blocks - len(self._lent)))

    def reserve(self, num_blocks: int) -> None:
        """Keep ``num_blocks`` free blocks out of lending: what the own running requests need
        next (the scheduler says so every step). Own allocations may still take them all."""
        _check_count(num_blocks)
        with self._lock:
            self._reserve = num_blocks

    # ---- own requests -------------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        _check_count(num_blocks)
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        """Take ``num_blocks`` local blocks for an own request, lowest ids first.

        All or nothing: ``None`` on shortfall, never a partial list.
        """
        _check_count(num_blocks)
        with self._lock:
            block_ids = self._take(num_blocks, _USED)
            if block_ids is None:
                return None
            self._num_used += num_blocks
        return [BlockRef(self.instance_id, b) for b in block_ids]

    def free(self, refs: Iterable[BlockRef], hashes: Iterable[bytes | None] | None = None) -> None:
        """Free local blocks of own requests. Validates every ref before freeing any.
        ``hashes``, one per ref: the content hash of a full rBlock to keep cached, or None."""
        refs = list(refs)
        with self._lock:
            block_ids = self._local_ids(refs)
            for b in block_ids:
                if self._state[b] != _USED:
                    raise ValueError(f"{BlockRef(self.instance_id, b)} is not in use here")
            self._give_back(block_ids, hashes)
            self._num_used -= len(block_ids)

    def take_cached(self, hashes: Iterable[bytes]) -> list[BlockRef]:
        """For an own request: the cached blocks holding ``hashes``' KV, the longest leading
        run of them, now in use (the prefix cache's hit here)."""
        with self._lock:
            block_ids = self._free.take_cached(hashes, len(self._free))
            for b in block_ids:
                self._state[b] = _USED
            self._num_used += len(block_ids)
        return [BlockRef(self.instance_id, b) for b in block_ids]

    def advertise(self, block_hash: bytes) -> None:
        """An own request holds a full rBlock of this content (``kvcache.prefix_index``)."""
        with self._lock:
            self._advertised.add(block_hash)

    def unadvertise(self, block_hash: bytes) -> None:
        """``advertise`` undone: no own request holds that rBlock any longer."""
        with self._lock:
            self._advertised.remove(block_hash)

    def cached_block_ids(self) -> list[int]:
        """The free blocks that keep a prefix's KV, least recently freed first."""
        with self._lock:
            return self._free.cached_block_ids()

    # ---- creditor side ------------------------------------------------------------------

    def can_lend(self, num_blocks: int) -> bool:
        _check_count(num_blocks)
        with self._lock:
            return num_blocks <= self._lendable()

    def lend(self, request: LendRequest) -> LendReply:
        """Serve a remote debtor: exactly ``request.num_blocks`` free local blocks, or false.

        Never partial, never beyond the lending cap, and never by borrowing on the debtor's
        behalf: only this pool's free blocks are considered. A request with ``hashes`` is
        granted the cached blocks holding that KV, the longest leading run of them within
        the cap (maybe none); the debtor attends them in place.
        """
        if request.num_blocks <= 0:
            raise ValueError(f"a lend request needs num_blocks > 0, got {request.num_blocks}")
        if request.debtor_id == self.instance_id:
            raise ValueError(f"instance {self.instance_id} cannot lend to itself")
        if request.hashes and len(request.hashes) != request.num_blocks:
            raise ValueError(f"{request.num_blocks} rBlocks asked by {len(request.hashes)} hashes")
        with self._lock:
            granted = None
            block_ids: list[int] | None = None
            if request.hashes:
                block_ids = self._free.take_cached(request.hashes, self._lendable())
                for b in block_ids:
                    self._state[b] = _LENT
            elif request.num_blocks <= self._lendable():
                block_ids = self._take(request.num_blocks, _LENT)
                assert block_ids is not None  # lendable <= free
            if block_ids is not None:
                self._lent.add(request.debtor_id, block_ids)
                granted = [BlockRef(self.instance_id, b) for b in block_ids]
            lendable = self._lendable()
        return LendReply(
            creditor_id=self.instance_id,
            debtor_id=request.debtor_id,
            request_id=request.request_id,
            granted=granted,
            num_lendable=lendable,
        )

    def reclaim(self, release: Release) -> None:
        """Take back blocks lent to ``release.debtor_id``; validates all before freeing any.
        Those the debtor gives a content hash for stay cached here."""
        with self._lock:
            block_ids = self._lent_ids(release.debtor_id, release.refs)
            self._lent.remove(release.debtor_id, block_ids)
            self._give_back(block_ids, release.hashes or None)

    def reclaim_all(self, debtor_id: int) -> int:
        """Free everything lent to ``debtor_id`` (the debtor died). Returns how many."""
        with self._lock:
            block_ids = self._lent.of(debtor_id)
            self._lent.remove(debtor_id, block_ids)
            self._give_back(block_ids)
        return len(block_ids)

    def repossess(self, debtor_id: int, refs: Iterable[BlockRef]) -> None:
        """Turn blocks lent to ``debtor_id`` into blocks of this instance's own requests.

        Used by a defragmentation swap: the slot stays occupied, only its owner changes
        (the debtor's data moves out while this instance's own data moves in).
        """
        refs = list(refs)
        with self._lock:
            block_ids = self._lent_ids(debtor_id, refs)
            self._lent.remove(debtor_id, block_ids)
            for b in block_ids:
                self._state[b] = _USED
            self._num_used += len(block_ids)

    def lent_refs(self, debtor_id: int | None = None) -> list[BlockRef]:
        """Blocks currently lent (to ``debtor_id``, or to anyone), sorted."""
        with self._lock:
            return [BlockRef(self.instance_id, b) for b in self._lent.of(debtor_id)]

    def lent_counts(self) -> dict[int, int]:
        """debtor_id -> number of blocks lent to it."""
        with self._lock:
            return self._lent.counts()

    # ---- debtor side --------------------------------------------------------------------

    def new_lend_request(self, num_blocks: int) -> LendRequest:
        """A ``LendRequest`` from this instance with a fresh per-debtor request id."""
        _check_count(num_blocks)
        return LendRequest(self.instance_id, num_blocks, next(self._lend_request_seq))

    def record_borrowed(self, refs: Iterable[BlockRef]) -> None:
        """Note remote blocks granted to this instance (from any creditors)."""
        refs = list(refs)
        with self._lock:
            self._borrowed.add(refs)

    def record_returned(self, refs: Iterable[BlockRef]) -> None:
        """Forget remote blocks given back to (or taken home from) their creditors."""
        refs = list(refs)
        with self._lock:
            self._borrowed.remove(refs)

    def has_borrowed(self, refs: Iterable[BlockRef]) -> bool:
        """Every ref is a remote block this instance holds (and none is listed twice)."""
        refs = list(refs)
        with self._lock:
            return self._borrowed.holds(refs)

    def drop_borrowed_from(self, creditor_id: int) -> list[BlockRef]:
        """Forget every block borrowed from ``creditor_id`` (it died); returns them, sorted,
        so the engine can abort the requests that used them."""
        with self._lock:
            return self._borrowed.pop_creditor(creditor_id)

    def borrowed_refs(self, creditor_id: int | None = None) -> list[BlockRef]:
        """Remote blocks held as debtor (from ``creditor_id``, or from anyone), sorted."""
        with self._lock:
            return self._borrowed.refs(creditor_id)

    def borrowed_counts(self) -> dict[int, int]:
        """creditor_id -> number of its blocks held by this instance."""
        with self._lock:
            return self._borrowed.counts()

    # ---- reporting ----------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """A consistent snapshot of this instance's memory for the gManager."""
        with self._lock:
            added, removed = self._advertised.drain()
            return Heartbeat(
                instance_id=self.instance_id,
                seq=next(self._heartbeat_seq),
                num_blocks=self.num_blocks,
                num_free=len(self._free),
                num_used=self._num_used,
                num_lent=len(self._lent),
                num_borrowed=len(self._borrowed),
                lendable=self._lendable(),
                lent_to=self._lent.counts(),
                borrowed_from=self._borrowed.counts(),
                num_cached=self._free.num_cached,
                prefix_added=added,
                prefix_removed=removed,
                tier=int(self.tier),
                host_of=self.host_of,
            )

    def owner_of(self, block_id: int) -> int | None:
        """Which instance's request occupies local block ``block_id`` (None: free)."""
        with self._lock:
            state = self._state[block_id]
            if state == _FREE:
                return None
            return self.instance_id if state == _USED else self._lent.debtor_of(block_id)

    def block_owners(self) -> list[int | None]:
        """``owner_of`` for every local block at once (one consistent snapshot)."""
        with self._lock:
            iid, debtor_of = self.instance_id, self._lent.debtor_of
            return [
                None if st == _FREE else iid if st == _USED else debtor_of(b)
                for b, st in enumerate(self._state)
            ]

    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is in exactly one consistent state."""
        with self._lock:
            iid, n = self.instance_id, self.num_blocks
            self._free.check_integrity(lambda b: self._state[b] == _FREE, f"instance {iid}")
            counts = [self._state.count(s) for s in (_FREE, _USED, _LENT)]
            assert counts[0] == len(self._free), (
                f"instance {iid}: {counts[0]} FREE blocks but {len(self._free)} listed free"
            )
            assert counts[1] == self._num_used, (
                f"instance {iid}: {counts[1]} USED blocks, counter says {self._num_used}"
            )
            assert counts[2] == len(self._lent), (
                f"instance {iid}: {counts[2]} LENT blocks, {len(self._lent)} tracked"
            )
            assert sum(counts) == n, f"instance {iid}: free+used+lent != {n}"
            self._lent.check_integrity()
            assert len(self._lent) <= self.max_lent_blocks, (
                f"instance {iid}: {len(self._lent)} lent > cap {self.max_lent_blocks}"
            )
            self._borrowed.check_integrity()

    # ---- internals (caller holds the lock) ----------------------------------------------

    def _take(self, num_blocks: int, state: int) -> list[int] | None:
        block_ids = self._free.take(num_blocks)
        if block_ids is not None:
            for b in block_ids:
                self._state[b] = state
        return block_ids

    def _give_back(
        self, block_ids: list[int], hashes: Iterable[bytes | None] | None = None
    ) -> None:
        self._free.give_back(block_ids, hashes)
        for b in block_ids:
            self._state[b] = _FREE

    def _local_ids(self, refs: list[BlockRef]) -> list[int]:
        block_ids = []
        for ref in refs:
            if ref.instance_id != self.instance_id:
                raise ValueError(f"{ref} names another instance than {self.instance_id}")
            if not 0 <= ref.block_id < self.num_blocks:
                raise ValueError(f"{ref} is out of range (pool of {self.num_blocks})")
            block_ids.append(ref.block_id)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate refs given to instance {self.instance_id}")
        return block_ids

    def _lent_ids(self, debtor_id: int, refs: list[BlockRef]) -> list[int]:
        block_ids = self._local_ids(refs)
        self._lent.check_lent_to(debtor_id, block_ids)
        return block_ids


def _check_count(num_blocks: int) -> None:
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
