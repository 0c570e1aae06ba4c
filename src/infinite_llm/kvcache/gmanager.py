"""GManager: the cluster's debt ledger and creditor recommender (one per cluster).

The gManager never allocates: it answers "who could lend me n rBlocks?" with a ranked
``Recommendation`` and the debtor negotiates with the creditors itself. It holds, behind one
lock (so queries may come from any thread):

* the debt ledger (``kvcache.ledger``), with the free blocks of each instance's last heartbeat;
* the creditor view (``kvcache.creditors``): each instance's estimated lendable blocks, the
  debts recommendations reserved on them, false replies, and the periodic ranking a query
  walks; a recommendation reserves the debt on its first candidate, so the next concurrent
  query prefers someone else (spreading debtors over creditors);
* the cluster's prefix index (``kvcache.prefix_index``: which instances serve a cached
  rBlock's content, from the heartbeats' changes);
* the prefill claims (``kvcache.claims``): which instance may start prefilling a request
  longer than its home pool, decided here at once for instances that step concurrently.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from infinite_llm.kvcache.claims import PrefillClaims, Rank
from infinite_llm.kvcache.creditors import CreditorView
from infinite_llm.kvcache.defrag import DefragPlan, plan_defragmentation
from infinite_llm.kvcache.ledger import DebtLedger, Edge
from infinite_llm.kvcache.messages import BorrowQuery, Heartbeat, Recommendation
from infinite_llm.kvcache.prefix_index import PrefixIndex


@dataclass(frozen=True)
class GManagerConfig:
    """How the gManager ranks creditors; ``kvcache.creditors`` explains each knob."""

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


class GManager:
    """Global debt ledger plus the free-memory view that ranks creditor candidates."""

    def __init__(
        self, config: GManagerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or GManagerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._ledger = DebtLedger()
        self._creditors = CreditorView(self.config)
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
            self._creditors.forget(instance_id)
            self._claims.forget_instance(instance_id)
            self._prefix.forget_instance(instance_id)

    def reset(self) -> None:
        with self._lock:
            self._ledger.reset()
            self._creditors.reset()
            self._claims.reset()
            self._prefix.reset()

    def rebuild(self, heartbeats: Iterable[Heartbeat]) -> None:
        """Forget everything and rebuild the view and ledger from one round of heartbeats (the
        prefill claims come back from the schedulers' next steps)."""
        with self._lock:
            self._ledger.reset()
            self._creditors.reset()
            self._claims.reset()
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
        with self._lock:
            creditor_ids, split = self._creditors.recommend(
                debtor_id, num_blocks, self._clock(), self._ledger.lent
            )
            self._stats.num_queries += 1
            self._stats.num_splits += bool(split)
            self._stats.num_empty += not creditor_ids and not split
        return Recommendation(debtor_id, num_blocks, creditor_ids, split)

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool:
        """Whether the creditors together (never the debtor) look able to lend ``num_blocks``
        now: a question about the whole cluster, however many shares it would take, that
        reserves nothing (``Borrower.can_borrow``)."""
        with self._lock:
            return self._creditors.can_lend(debtor_id, num_blocks, self._clock())

    def resort(self) -> None:
        """Rank the creditors afresh at the next query (after a forced round of heartbeats)."""
        with self._lock:
            self._creditors.resort()

    def handle_query(self, query: BorrowQuery) -> Recommendation:
        return self.recommend(query.debtor_id, query.num_blocks)

    def report_false(self, creditor_id: int, num_lendable: int = 0) -> None:
        """A creditor refused a lend: skip it until a heartbeat shows > ``num_lendable``."""
        with self._lock:
            self._stats.num_false_replies += 1
            self._creditors.refused(creditor_id, num_lendable)

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
            self._creditors.lent(creditor_id, num_blocks)

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        with self._lock:
            self._ledger.record_release(debtor_id, creditor_id, num_blocks)
            self._creditors.released(creditor_id, num_blocks)

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
            return self._creditors.available(instance_id)

    def is_available(self, instance_id: int) -> bool:
        """Known, heard from within the timeout, and not blocked by a false."""
        with self._lock:
            return self._creditors.is_available(instance_id, self._clock())

    def instance_ids(self) -> list[int]:
        with self._lock:
            return self._creditors.instance_ids()

    def stale_instance_ids(self) -> list[int]:
        """Known instances whose heartbeat is older than the timeout."""
        with self._lock:
            return self._creditors.stale_instance_ids(self._clock())

    def stats(self) -> GManagerStats:
        with self._lock:
            s = self._stats
            return GManagerStats(
                s.num_queries,
                s.num_empty,
                s.num_splits,
                s.num_false_replies,
                self._creditors.num_sorts,
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
            return plan_defragmentation(
                self._ledger,
                free_blocks=free,
                reserve_blocks=reserve_blocks,
                tiers=self._creditors.tiers(),
                lendable=self._creditors.lendable(),
            )

    def check_integrity(self) -> None:
        with self._lock:
            self._ledger.check_integrity()
            self._creditors.check_integrity()
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
        self._creditors.on_heartbeat(hb, now)
