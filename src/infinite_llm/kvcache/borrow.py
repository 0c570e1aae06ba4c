"""The debtor's side of borrowing: ask the gManager, negotiate with creditors, give back.

The transport is injected: ``send_lend(creditor_id, LendRequest) -> LendReply`` and
``send_release(creditor_id, Release) -> None`` may call an in-process ``RManager`` directly or
a remote actor; nothing here knows threads or Ray. A transport that cannot reach a creditor
should answer a false ``LendReply`` (so the debtor moves on) rather than raise.

Policy (our reading; the paper leaves it open):

* One creditor per need when possible: the debtor asks the recommended creditors in order
  for *all* ``num_blocks``; the first that grants wins. New rBlocks on one instance add at
  most one remote MicroAttention to the request.
* Split only when the gManager says nobody can hold it all (``Recommendation.split``) and a
  ``send_release`` is available: every share is asked all-or-nothing, and if any share is
  refused, the shares already granted are released. ``borrow`` never returns a partial set.
* Each false is reported to the gManager (which then skips that creditor until its next
  heartbeat shows more room). When every candidate said false the debtor asks the gManager
  again, at most ``max_rounds`` times in all; an empty recommendation ends the attempt.
* Every grant is recorded on the debtor (``record_borrowed``) and in the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.claims import Rank
from infinite_llm.kvcache.messages import LendReply, LendRequest, Recommendation, Release
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.prefix import PrefixCache
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.shared import SharedBlocks, tail_first

SendLend = Callable[[int, LendRequest], LendReply]
SendRelease = Callable[[int, Release], None]


class GManagerLike(Protocol):
    """What the debtor needs from the gManager (a ``GManager`` or a proxy to a remote one)."""

    def recommend(self, debtor_id: int, num_blocks: int) -> Recommendation: ...

    def report_false(self, creditor_id: int, num_lendable: int = 0) -> None: ...

    def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None: ...

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None: ...

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool: ...

    def claim_prefill(self, instance_id: int, rank: Rank) -> bool: ...

    def sync_prefills(self, instance_id: int, ranks: Collection[Rank]) -> None: ...

    def prefill_way(self, instance_id: int) -> Rank | None: ...

    def prefix_holders(self, hashes: Sequence[bytes]) -> list[tuple[int, ...]]: ...


class RefreshOnEmpty:
    """A ``GManagerLike`` that, when it has no creditor to recommend, first refreshes the
    gManager's view with a round of heartbeats (``refresh``) and asks again: at most once per
    ``arm()`` (the cluster arms it before each step). Memory freed since the last heartbeat
    is then found by the step that needs it, instead of that step preempting a request."""

    def __init__(self, gmanager: Any, refresh: Callable[[], None]) -> None:
        self._gmanager = gmanager
        self._refresh = refresh
        self._armed = True
        self.num_refreshes = 0

    def arm(self) -> None:
        self._armed = True

    def recommend(self, debtor_id: int, num_blocks: int) -> Recommendation:
        rec = self._gmanager.recommend(debtor_id, num_blocks)
        if rec.is_empty and self._armed:
            self._armed = False
            self.num_refreshes += 1
            self._refresh()
            self._gmanager.resort()
            rec = self._gmanager.recommend(debtor_id, num_blocks)
        return rec

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool:
        """``GManager.can_lend``, refreshed as ``recommend`` is when the answer is no."""
        if self._gmanager.can_lend(debtor_id, num_blocks):
            return True
        if not self._armed:
            return False
        self._armed = False
        self.num_refreshes += 1
        self._refresh()
        return self._gmanager.can_lend(debtor_id, num_blocks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gmanager, name)


@dataclass(frozen=True)
class BorrowConfig:
    max_rounds: int = 3
    allow_split: bool = True

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")


def borrow(
    debtor: RManager,
    gmanager: GManagerLike,
    num_blocks: int,
    send_lend: SendLend,
    *,
    send_release: SendRelease | None = None,
    config: BorrowConfig | None = None,
    stats: BorrowStats | None = None,
) -> list[BlockRef] | None:
    """Borrow exactly ``num_blocks`` remote rBlocks for ``debtor``, or None (nothing held)."""
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
    config = config or BorrowConfig()
    stats = stats if stats is not None else BorrowStats()
    start = time.perf_counter()
    granted = None
    try:
        for _ in range(config.max_rounds):
            rec = gmanager.recommend(debtor.instance_id, num_blocks)
            stats.add(num_rounds=1)
            for creditor_id in rec.creditor_ids:
                granted = _ask(debtor, gmanager, creditor_id, num_blocks, send_lend, stats)
                if granted is not None:
                    return granted
            if rec.split and config.allow_split and send_release is not None:
                granted = _ask_split(debtor, gmanager, rec.split, send_lend, send_release, stats)
                if granted is not None:
                    stats.add(num_split=1)
                    return granted
            if rec.is_empty:
                break
        return None
    finally:
        stats.add(
            num_borrows=1,
            num_granted=granted is not None,
            num_failed=granted is None,
            num_blocks_borrowed=len(granted) if granted else 0,
        )
        stats.latency.record(time.perf_counter() - start)


def release(
    debtor: RManager,
    gmanager: GManagerLike,
    refs: Iterable[BlockRef],
    send_release: SendRelease,
    *,
    stats: BorrowStats | None = None,
    hashes: Sequence[bytes | None] | None = None,
) -> None:
    """Give borrowed rBlocks back to their creditors (one ``Release`` per creditor).
    ``hashes``, one per ref: the content hash the creditor may keep the rBlock cached under.

    Validates every ref first. The debtor forgets a creditor's refs *before* sending: once
    the creditor frees them it may lend the same blocks to this debtor again at once (from
    another thread). If ``send_release`` raises, the refs are recorded again (the creditor
    still holds them lent, so nobody else can have them) and the error propagates.
    """
    refs = list(refs)
    names = list(hashes) if hashes is not None else [None] * len(refs)
    if len(names) != len(refs):
        raise ValueError(f"{len(names)} hashes for {len(refs)} rBlocks")
    by_creditor: dict[int, list[BlockRef]] = {}
    named: dict[int, list[bytes | None]] = {}
    for ref, h in zip(refs, names, strict=True):
        by_creditor.setdefault(ref.instance_id, []).append(ref)
        named.setdefault(ref.instance_id, []).append(h)
    if not debtor.has_borrowed(refs):
        raise ValueError(f"instance {debtor.instance_id} did not borrow all of {refs}")
    for creditor_id in sorted(by_creditor):
        group = by_creditor[creditor_id]
        group_hashes = tuple(named[creditor_id]) if any(named[creditor_id]) else ()
        debtor.record_returned(group)
        try:
            send_release(creditor_id, Release(debtor.instance_id, group, group_hashes))
        except BaseException:
            debtor.record_borrowed(group)
            raise
        gmanager.record_release(debtor.instance_id, creditor_id, len(group))
    if stats is not None:
        stats.add(num_blocks_released=len(refs))


class Borrower:
    """One debtor's borrowing, with its transport, gManager and counters bound once.

    ``allocate``/``free`` make it a block allocator for the scheduler: local rBlocks first,
    borrowed ones for the rest, and every rBlock of a request freed where it lives, once its
    last holder here lets go (``shared``: a borrowed rBlock several requests here share is
    lent to this instance once and released once). ``prefix``: the prefix cache (None when
    off), which takes cached rBlocks of other instances through ``borrow_cached``.
    """

    def __init__(
        self,
        debtor: RManager,
        gmanager: GManagerLike,
        send_lend: SendLend,
        send_release: SendRelease,
        *,
        config: BorrowConfig | None = None,
        stats: BorrowStats | None = None,
        prefix_block_size: int | None = None,
    ) -> None:
        self.debtor = debtor
        self.gmanager = gmanager
        self.send_lend = send_lend
        self.send_release = send_release
        self.config = config or BorrowConfig()
        self.stats = stats if stats is not None else BorrowStats()
        self.shared = SharedBlocks()
        self.prefix = (
            PrefixCache(debtor, prefix_block_size, remote=self.borrow_cached)
            if prefix_block_size is not None
            else None
        )

    def borrow(self, num_blocks: int) -> list[BlockRef] | None:
        return borrow(
            self.debtor,
            self.gmanager,
            num_blocks,
            self.send_lend,
            send_release=self.send_release,
            config=self.config,
            stats=self.stats,
        )

    def release(
        self, refs: Iterable[BlockRef], hashes: Sequence[bytes | None] | None = None
    ) -> None:
        release(
            self.debtor, self.gmanager, refs, self.send_release, stats=self.stats, hashes=hashes
        )

    def borrow_cached(self, hashes: list[bytes]) -> list[BlockRef]:
        """rBlocks another instance keeps cached with the KV of ``hashes``' leading run, lent
        to this one in place (maybe none): the creditor the gManager's prefix index names for
        the longest run is asked for exactly those; it lends what it still has."""
        me = self.debtor.instance_id
        holders = self.gmanager.prefix_holders(hashes)
        best, run = None, 0
        for creditor_id in holders[0] if holders else ():
            if creditor_id == me:
                continue
            n = 1
            while n < len(holders) and creditor_id in holders[n]:
                n += 1
            if n > run:
                best, run = creditor_id, n
        if best is None:
            return []
        request = LendRequest(
            me, run, self.debtor.new_lend_request(run).request_id, tuple(hashes[:run])
        )
        reply = self.send_lend(best, request)
        granted = list(reply.granted or ())
        if len(granted) > run or any(ref.instance_id != best for ref in granted):
            raise ValueError(f"malformed reply from creditor {best} to {request}: {reply}")
        if granted:
            self.debtor.record_borrowed(granted)
            self.gmanager.record_lend(me, best, len(granted))
        return granted

    @property
    def num_blocks(self) -> int:
        return self.debtor.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.debtor.num_free_blocks

    def reserve(self, num_blocks: int) -> None:
        self.debtor.reserve(num_blocks)

    def can_borrow(self, num_blocks: int) -> bool:
        """Whether the cluster looks able to lend ``num_blocks`` now, in as many shares as it
        takes (the gManager's view: a hint that holds nothing)."""
        return num_blocks <= 0 or self.gmanager.can_lend(self.debtor.instance_id, num_blocks)

    def claim_prefill(self, rank: Rank) -> bool:
        """The gManager's prefill claim for this instance (``GManager.claim_prefill``)."""
        return self.gmanager.claim_prefill(self.debtor.instance_id, rank)

    def sync_prefills(self, ranks: Collection[Rank]) -> None:
        """This instance's prefill claims are exactly ``ranks`` (``GManager.sync_prefills``)."""
        self.gmanager.sync_prefills(self.debtor.instance_id, ranks)

    def prefill_way(self) -> Rank | None:
        """The oldest prefill claim of another instance (``GManager.prefill_way``)."""
        return self.gmanager.prefill_way(self.debtor.instance_id)

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        """Local blocks first, the rest borrowed; all or nothing (None holds nothing)."""
        local_n = min(num_blocks, self.debtor.num_free_blocks)
        local = self.debtor.allocate(local_n) if local_n else []
        if local is None:  # another thread took them meanwhile
            local = []
        if len(local) == num_blocks:
            return local
        remote = self.borrow(num_blocks - len(local))
        if remote is None:
            self.debtor.free(local)
            return None
        return local + remote

    def free(self, refs: Iterable[BlockRef]) -> None:
        """Free a request's rBlocks: local ones to the pool, remote ones to their creditors
        (those another request here still holds stay)."""
        refs = self.shared.release(tail_first(refs))
        names = self.prefix.forget(refs) if self.prefix else [None] * len(refs)
        home = self.debtor.instance_id
        local = [i for i, r in enumerate(refs) if r.instance_id == home]
        self.debtor.free([refs[i] for i in local], [names[i] for i in local])
        remote = [i for i, r in enumerate(refs) if r.instance_id != home]
        if remote:
            self.release([refs[i] for i in remote], [names[i] for i in remote])


def _ask(
    debtor: RManager,
    gmanager: GManagerLike,
    creditor_id: int,
    num_blocks: int,
    send_lend: SendLend,
    stats: BorrowStats,
) -> list[BlockRef] | None:
    """One all-or-nothing lend request; records a grant, reports a false."""
    request = debtor.new_lend_request(num_blocks)
    reply = send_lend(creditor_id, request)
    if not reply.ok:
        stats.add(num_false_replies=1)
        gmanager.report_false(creditor_id, reply.num_lendable)
        return None
    granted = list(reply.granted or ())
    if (
        reply.creditor_id != creditor_id
        or len(granted) != num_blocks
        or len(set(granted)) != num_blocks
        or any(ref.instance_id != creditor_id for ref in granted)
    ):
        raise ValueError(f"malformed reply from creditor {creditor_id} to {request}: {reply}")
    debtor.record_borrowed(granted)
    gmanager.record_lend(debtor.instance_id, creditor_id, num_blocks)
    return granted


def _ask_split(
    debtor: RManager,
    gmanager: GManagerLike,
    shares: tuple[tuple[int, int], ...],
    send_lend: SendLend,
    send_release: SendRelease,
    stats: BorrowStats,
) -> list[BlockRef] | None:
    granted: list[BlockRef] = []
    for creditor_id, n in shares:
        got = _ask(debtor, gmanager, creditor_id, n, send_lend, stats)
        if got is None:
            if granted:
                release(debtor, gmanager, granted, send_release)
            return None
        granted += got
    return granted
