"""GManager: the cluster's debt ledger and creditor recommender (one per cluster).

The gManager never allocates: it answers "who could lend me n rBlocks?" with a ranked
``Recommendation`` and the debtor negotiates with the creditors itself. Its view is loose:

* each instance's *estimated lendable* blocks come from its last heartbeat, lowered by lends
  and raised by releases that debtors report, and reset by the next heartbeat;
* a recommendation *reserves* the debt on its first candidate in that estimate, so the next
  concurrent query prefers someone else (spreading debtors over creditors); the reservation
  is used up by ``record_lend`` or dropped by the creditor's next heartbeat;
* a creditor that answered false is skipped until a heartbeat shows more room than it had
  when it said false (``report_false``);
* an instance whose heartbeat is older than ``heartbeat_timeout_s`` (or never came) is out.

Scalability: instances are sorted by estimated lendable memory *periodically* (every
``resort_every_heartbeats`` heartbeats, every ``resort_interval_s``, on membership changes,
or when a query had to skip ``resort_after_skips`` exhausted entries), never per query. A
query walks the sorted list from the top, stops where sort-time room falls below its need,
collects the first ``window`` eligible instances and orders just those by their live
estimate: O(window + skips) per query. Within the window the faster memory tier comes
first (``kvcache.tiers``: model instances' pools, then host pools, the debtor's own first, then
memory instances; a tier beyond the window's most-room candidates is not seen), then
instances that do not themselves owe the debtor: lending back to one's own creditor makes a
debt cycle, which costs locality until defragmentation undoes it. Instances that gained room since the last sort are
seen after the next one. All methods take one lock, so queries may come from any thread.

It also keeps the cluster's prefix index (``kvcache.prefix_index``: which instances serve a
cached rBlock's content, from the heartbeats' changes), and holds the prefill claims (``kvcache.claims``): which instance may start prefilling a
request longer than its home pool, decided here at once for instances that step concurrently.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from infinite_llm.kvcache.claims import PrefillClaims, Rank
from infinite_llm.kvcache.defrag import DefragPlan, plan_defragmentation
from infinite_llm.kvcache.ledger import DebtLedger, Edge
from infinite_llm.kvcache.messages import BorrowQuery, Heartbeat, Recommendation
from infinite_llm.kvcache.prefix_index import PrefixIndex


@dataclass(frozen=True)
class GManagerConfig:
    """How the gManager ranks creditors; see the module docstring for each knob."""

    heartbeat_timeout_s: float = 5.0
    resort_every_heartbeats: int = 32
    resort_interval_s: float = 0.05
    resort_after_skips: int = 64
    window: int = 8
    max_candidates: int = 4
    allow_split: bool = True
    max_split_creditors: int = 8

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_candidates < 1 or self.max_split_creditors < 1:
            raise ValueError("window, max_candidates and max_split_creditors must be >= 1")
        if self.heartbeat_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be > 0")


@dataclass(slots=True)
class GManagerStats:
    """Counters since the gManager started (a snapshot when returned by ``stats()``)."""

    num_queries: int = 0
    num_empty: int = 0
    num_splits: int = 0
    num_false_replies: int = 0
    num_sorts: int = 0
    num_heartbeats: int = 0
    num_ignored_heartbeats: int = 0  # out of order: older than one already seen


@dataclass(slots=True)
class _View:
    """What the gManager believes about one instance as a creditor."""

    lendable: int
    seen_at: float
    reserved: int = 0
    blocked_below: int | None = None  # set by a false: skip until lendable > this
    tier: int = 0  # ``kvcache.tiers.Tier``
    host_of: int | None = None  # a host pool's model instance

    def tier_rank(self, debtor_id: int) -> tuple[int, bool]:
        """Fastest first: the tier, and within the host tier the debtor's own host pool."""
        return self.tier, self.host_of != debtor_id

    @property
    def available(self) -> int:
        return self.lendable - self.reserved


class GManager:
    """Global debt ledger plus the free-memory view that ranks creditor candidates."""

    def __init__(
        self, config: GManagerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or GManagerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._ledger = DebtLedger()
        self._views: dict[int, _View] = {}
        self._ranking: list[tuple[int, int]] = []  # (instance_id, available at sort), best first
        self._sorted_at = float("-inf")
        self._heartbeats_since_sort = 0
        self._needs_sort = True
        self._stats = GManagerStats()
        self._claims = PrefillClaims()
        self._prefix = PrefixIndex()

    # ---- heartbeats and membership ------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat) -> None:
        """Refresh an instance's view and the ledger edges it is the authority for.

        A heartbeat whose ``seq`` is not newer than the last one seen is ignored (it was
        overtaken in transit); a restarted instance, whose seq starts over, must first be
        dropped with ``forget_instance``.
        """
        with self._lock:
            self._on_heartbeat(hb, self._clock())

    def forget_instance(self, instance_id: int) -> None:
        """An instance died: drop its view and every ledger edge touching it."""
        with self._lock:
            self._ledger.forget_instance(instance_id)
            self._views.pop(instance_id, None)
            self._claims.forget_instance(instance_id)
            self._prefix.forget_instance(instance_id)
            self._needs_sort = True

    def reset(self) -> None:
        with self._lock:
            self._ledger.reset()
            self._views.clear()
            self._claims.reset()
            self._prefix.reset()
            self._needs_sort = True

    def rebuild(self, heartbeats: Iterable[Heartbeat]) -> None:
        """Forget everything and rebuild the view and ledger from one round of heartbeats (the
        prefill claims come back from the schedulers' next steps)."""
        with self._lock:
            self._ledger.reset()
            self._views.clear()
            self._claims.reset()
            self._needs_sort = True
            now = self._clock()
            for hb in heartbeats:
                self._on_heartbeat(hb, now)

    # ---- recommendations ----------------------------------------------------------------

    def recommend(self, debtor_id: int, num_blocks: int) -> Recommendation:
        """Rank creditors (never the debtor) that could lend ``num_blocks``; reserve on the first.

        If nobody can lend all of it and splitting is allowed, propose shares instead.
        """
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        cfg = self.config
        with self._lock:
            now = self._clock()
            self._maybe_sort(now)
            deadline = now - cfg.heartbeat_timeout_s
            views = self._views
            owes = self._ledger.lent
            # (tier, not the debtor's own host pool, owes the debtor, -available, id)
            window: list[tuple[int, bool, bool, int, int]] = []
            skipped = 0
            for creditor_id, available_at_sort in self._ranking:
                if available_at_sort < num_blocks:
                    break  # sorted: nobody further down had room at sort time
                v = views.get(creditor_id)
                if (
                    v is None
                    or creditor_id == debtor_id
                    or v.blocked_below is not None
                    or v.seen_at < deadline
                    or v.lendable - v.reserved < num_blocks
                ):
                    skipped += 1
                    continue
                window.append(
                    (
                        *v.tier_rank(debtor_id),
                        owes(creditor_id, debtor_id) > 0,
                        v.reserved - v.lendable,
                        creditor_id,
                    )
                )
                if len(window) >= cfg.window:
                    break
            if skipped >= cfg.resort_after_skips:
                self._needs_sort = True
            window.sort()
            creditor_ids = tuple(entry[-1] for entry in window[: cfg.max_candidates])
            split: tuple[tuple[int, int], ...] = ()
            if creditor_ids:
                views[creditor_ids[0]].reserved += num_blocks
            elif cfg.allow_split:
                split = self._split(debtor_id, num_blocks, deadline)
            self._stats.num_queries += 1
            self._stats.num_splits += bool(split)
            self._stats.num_empty += not creditor_ids and not split
        return Recommendation(debtor_id, num_blocks, creditor_ids, split)

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool:
        """Whether the creditors together (never the debtor) look able to lend ``num_blocks``
        now: a question about the whole cluster, however many shares it would take, that
        reserves nothing (``Borrower.can_borrow``)."""
        with self._lock:
            deadline = self._clock() - self.config.heartbeat_timeout_s
            total = 0
            for creditor_id, v in self._views.items():
                if creditor_id != debtor_id and v.blocked_below is None and v.seen_at >= deadline:
                    total += max(0, v.available)
            return total >= num_blocks

    def resort(self) -> None:
        """Rank the creditors afresh at the next query (after a forced round of heartbeats)."""
        with self._lock:
            self._needs_sort = True

    def handle_query(self, query: BorrowQuery) -> Recommendation:
        return self.recommend(query.debtor_id, query.num_blocks)

    def report_false(self, creditor_id: int, num_lendable: int = 0) -> None:
        """A creditor refused a lend: skip it until a heartbeat shows > ``num_lendable``."""
        with self._lock:
            self._stats.num_false_replies += 1
            v = self._views.get(creditor_id)
            if v is not None:
                v.blocked_below = num_lendable
                v.lendable = num_lendable
                v.reserved = 0

    # ---- the prefix index (``kvcache.prefix_index``) ------------------------------------

    def prefix_holders(self, hashes: Sequence[bytes]) -> list[tuple[int, ...]]:
        """Per leading hash, the instances that advertise it (``PrefixIndex.holders``)."""
        with self._lock:
            return self._prefix.holders(hashes)

    def prefix_matches(self, hashes: Sequence[bytes]) -> dict[int, int]:
        """Per instance, how many leading hashes it advertises (``PrefixIndex.matches``)."""
        with self._lock:
            return self._prefix.matches(hashes)

    # ---- prefill claims (``kvcache.claims``) --------------------------------------------

    def claim_prefill(self, instance_id: int, rank: Rank) -> bool:
        """Let ``instance_id`` start prefilling the request of ``rank`` past its home pool:
        granted (and held) while no other instance holds a claim (``PrefillClaims.claim``)."""
        with self._lock:
            return self._claims.claim(instance_id, rank)

    def sync_prefills(self, instance_id: int, ranks: Iterable[Rank]) -> None:
        """``instance_id``'s claims are exactly ``ranks``, the requests still prefilling past
        their home pool there (the others finished their prompt, were preempted or ended)."""
        with self._lock:
            self._claims.sync(instance_id, ranks)

    def prefill_way(self, instance_id: int) -> Rank | None:
        """The oldest claim held by another instance than ``instance_id`` (None: none)."""
        with self._lock:
            return self._claims.way(instance_id)

    # ---- ledger updates from debtors ----------------------------------------------------

    def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        with self._lock:
            self._ledger.record_lend(debtor_id, creditor_id, num_blocks)
            v = self._views.get(creditor_id)
            if v is not None:
                v.lendable = max(0, v.lendable - num_blocks)
                v.reserved = max(0, v.reserved - num_blocks)

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        with self._lock:
            self._ledger.record_release(debtor_id, creditor_id, num_blocks)
            v = self._views.get(creditor_id)
            if v is not None:
                v.lendable += num_blocks  # an over-estimate past the cap is cured by a false

    # ---- queries ------------------------------------------------------------------------

    def edges(self) -> dict[Edge, int]:
        """(debtor_id, creditor_id) -> rBlocks lent, per the ledger."""
        with self._lock:
            return self._ledger.edges()

    def free_blocks(self) -> dict[int, int]:
        """instance_id -> free blocks as of its last heartbeat."""
        with self._lock:
            return self._ledger.free_blocks()

    def available(self, instance_id: int) -> int | None:
        """Estimated lendable blocks minus reservations (None: unknown instance)."""
        with self._lock:
            v = self._views.get(instance_id)
            return None if v is None else v.available

    def is_available(self, instance_id: int) -> bool:
        """Known, heard from within the timeout, and not blocked by a false."""
        with self._lock:
            v = self._views.get(instance_id)
            now = self._clock()
            return (
                v is not None
                and v.blocked_below is None
                and now - v.seen_at <= self.config.heartbeat_timeout_s
            )

    def instance_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._views)

    def stale_instance_ids(self) -> list[int]:
        """Known instances whose heartbeat is older than the timeout."""
        with self._lock:
            now, timeout = self._clock(), self.config.heartbeat_timeout_s
            return sorted(i for i, v in self._views.items() if now - v.seen_at > timeout)

    def stats(self) -> GManagerStats:
        with self._lock:
            s = self._stats
            return GManagerStats(
                s.num_queries,
                s.num_empty,
                s.num_splits,
                s.num_false_replies,
                s.num_sorts,
                s.num_heartbeats,
                s.num_ignored_heartbeats,
            )

    @property
    def ledger(self) -> DebtLedger:
        """The live ledger. Not locked: read it only while no other thread uses this
        gManager, or call ``edges()``/``free_blocks()``/``plan_defragmentation()``."""
        return self._ledger

    def plan_defragmentation(
        self, *, with_repatriation: bool = False, reserve_blocks: int = 0
    ) -> DefragPlan:
        """Plan cycle swaps (and, if asked, repatriations, and promotions up a memory tier)
        from the current ledger and view."""
        with self._lock:
            free = self._ledger.free_blocks() if with_repatriation else None
            tiers = {i: v.tier for i, v in self._views.items()}
            lendable = {i: max(0, v.available) for i, v in self._views.items()}
            return plan_defragmentation(
                self._ledger,
                free_blocks=free,
                reserve_blocks=reserve_blocks,
                tiers=tiers,
                lendable=lendable,
            )

    def check_integrity(self) -> None:
        with self._lock:
            self._ledger.check_integrity()
            for i, v in self._views.items():
                assert v.lendable >= 0, f"gmanager: negative lendable for {i}"
                assert v.reserved >= 0, f"gmanager: negative reservation for {i}"
            self._claims.check_integrity()

    # ---- internals (caller holds the lock) ----------------------------------------------

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        # The index takes every heartbeat's changes, even one overtaken in transit: an
        # entry out of date only costs a miss (``kvcache.prefix_index``).
        self._prefix.apply(hb.instance_id, hb.prefix_added, hb.prefix_removed)
        if not self._ledger.on_heartbeat(hb, now):
            self._stats.num_ignored_heartbeats += 1
            return
        self._stats.num_heartbeats += 1
        self._heartbeats_since_sort += 1
        v = self._views.get(hb.instance_id)
        if v is None:
            self._views[hb.instance_id] = _View(hb.lendable, now, tier=hb.tier, host_of=hb.host_of)
            self._needs_sort = True
            return
        if v.blocked_below is not None and hb.lendable > v.blocked_below:
            v.blocked_below = None
        v.lendable, v.reserved, v.seen_at = hb.lendable, 0, now

    def _maybe_sort(self, now: float) -> None:
        if (
            self._needs_sort
            or self._heartbeats_since_sort >= self.config.resort_every_heartbeats
            or now - self._sorted_at >= self.config.resort_interval_s
        ):
            deadline = now - self.config.heartbeat_timeout_s
            entries = [
                (v.reserved - v.lendable, i)  # (-available, id): most room first
                for i, v in self._views.items()
                if v.lendable > v.reserved and v.blocked_below is None and v.seen_at >= deadline
            ]
            entries.sort()
            self._ranking = [(i, -neg) for neg, i in entries]
            self._sorted_at = now
            self._heartbeats_since_sort = 0
            self._needs_sort = False
            self._stats.num_sorts += 1

    def _split(
        self, debtor_id: int, num_blocks: int, deadline: float
    ) -> tuple[tuple[int, int], ...]:
        """Greedy shares over the ranking, largest first; () if they cannot cover the need."""
        shares: list[tuple[int, int]] = []
        remaining = num_blocks
        for creditor_id, _ in self._ranking:
            v = self._views.get(creditor_id)
            if (
                v is None
                or creditor_id == debtor_id
                or v.blocked_below is not None
                or v.seen_at < deadline
                or v.available <= 0
            ):
                continue
            share = min(v.available, remaining)
            shares.append((creditor_id, share))
            remaining -= share
            if remaining == 0 or len(shares) == self.config.max_split_creditors:
                break
        if remaining > 0:
            return ()
        for creditor_id, share in shares:
            self._views[creditor_id].reserved += share
        return tuple(shares)
