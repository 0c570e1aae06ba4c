"""``CreditorView``: the gManager's loose view of every instance as a creditor, and the ranking
that answers "who could lend me n rBlocks?" (``GManager.recommend``).

Per instance: the *estimated lendable* blocks of its last heartbeat, lowered by lends and
raised by releases that debtors report, and reset by the next heartbeat; the blocks a
recommendation *reserved* on it; a false reply's bar (skip it until a heartbeat shows more
room than it had when it said false); its memory tier. An instance whose heartbeat is older
than ``heartbeat_timeout_s`` (or never came) is out.

The ranking is sorted by estimated lendable memory *periodically* (every
``resort_every_heartbeats`` heartbeats, every ``resort_interval_s``, on membership changes, or
when a query had to skip ``resort_after_skips`` exhausted entries), never per query. A query
walks it from the top, stops where sort-time room falls below its need, collects the first
``window`` eligible instances and orders just those by their live estimate: O(window + skips)
per query. Within the window the faster memory tier comes first (``kvcache.tiers``: model
instances' pools, then host pools, the debtor's own first, then memory instances; a tier
beyond the window's most-room candidates is not seen), then instances that do not themselves
owe the debtor: lending back to one's own creditor makes a debt cycle, which costs locality
until defragmentation undoes it. Instances that gained room since the last sort are seen
after the next one.

Not locked: the gManager calls it under its own lock, with the time of the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infinite_llm.kvcache.messages import Heartbeat

if TYPE_CHECKING:
    from infinite_llm.kvcache.gmanager import GManagerConfig

Shares = tuple[tuple[int, int], ...]  # (creditor_id, blocks) of a split


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


class CreditorView:
    def __init__(self, config: GManagerConfig) -> None:
        self.config = config
        self._views: dict[int, _View] = {}
        self._ranking: list[tuple[int, int]] = []  # (instance_id, available at sort), best first
        self._sorted_at = float("-inf")
        self._heartbeats_since_sort = 0
        self._needs_sort = True
        self.num_sorts = 0

    # ---- membership and heartbeats ------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        """A heartbeat the ledger accepted (newer than the last one seen)."""
        self._heartbeats_since_sort += 1
        v = self._views.get(hb.instance_id)
        if v is None:
            self._views[hb.instance_id] = _View(hb.lendable, now, tier=hb.tier, host_of=hb.host_of)
            self._needs_sort = True
            return
        if v.blocked_below is not None and hb.lendable > v.blocked_below:
            v.blocked_below = None
        v.lendable, v.reserved, v.seen_at = hb.lendable, 0, now

    def forget(self, instance_id: int) -> None:
        self._views.pop(instance_id, None)
        self._needs_sort = True

    def reset(self) -> None:
        self._views.clear()
        self._needs_sort = True

    def resort(self) -> None:
        """Rank afresh at the next query."""
        self._needs_sort = True

    # ---- what debtors and creditors report ----------------------------------------------

    def lent(self, creditor_id: int, num_blocks: int) -> None:
        v = self._views.get(creditor_id)
        if v is not None:
            v.lendable = max(0, v.lendable - num_blocks)
            v.reserved = max(0, v.reserved - num_blocks)

    def released(self, creditor_id: int, num_blocks: int) -> None:
        v = self._views.get(creditor_id)
        if v is not None:
            v.lendable += num_blocks  # an over-estimate past the cap is cured by a false

    def refused(self, creditor_id: int, num_lendable: int) -> None:
        """A false reply: skip the creditor until a heartbeat shows > ``num_lendable``."""
        v = self._views.get(creditor_id)
        if v is not None:
            v.blocked_below = num_lendable
            v.lendable = num_lendable
            v.reserved = 0

    # ---- recommendations ----------------------------------------------------------------

    def recommend(
        self, debtor_id: int, num_blocks: int, now: float, owes: Callable[[int, int], int]
    ) -> tuple[tuple[int, ...], Shares]:
        """(ranked creditors that could lend all ``num_blocks``, reserved on the first), or, if
        none and splitting is allowed, shares that cover it (each reserved); never the debtor.
        ``owes(creditor, debtor)``: blocks the creditor owes the debtor (the ledger)."""
        cfg = self.config
        self._maybe_sort(now)
        deadline = now - cfg.heartbeat_timeout_s
        views = self._views
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
        if creditor_ids:
            views[creditor_ids[0]].reserved += num_blocks
            return creditor_ids, ()
        return (), self._split(debtor_id, num_blocks, deadline) if cfg.allow_split else ()

    def can_lend(self, debtor_id: int, num_blocks: int, now: float) -> bool:
        """Whether the creditors together (never the debtor) look able to lend ``num_blocks``,
        however many shares it would take; reserves nothing."""
        deadline = now - self.config.heartbeat_timeout_s
        total = 0
        for creditor_id, v in self._views.items():
            if creditor_id != debtor_id and v.blocked_below is None and v.seen_at >= deadline:
                total += max(0, v.available)
        return total >= num_blocks

    # ---- queries ------------------------------------------------------------------------

    def available(self, instance_id: int) -> int | None:
        """Estimated lendable blocks minus reservations (None: unknown instance)."""
        v = self._views.get(instance_id)
        return None if v is None else v.available

    def is_available(self, instance_id: int, now: float) -> bool:
        """Known, heard from within the timeout, and not blocked by a false."""
        v = self._views.get(instance_id)
        return (
            v is not None
            and v.blocked_below is None
            and now - v.seen_at <= self.config.heartbeat_timeout_s
        )

    def instance_ids(self) -> list[int]:
        return sorted(self._views)

    def stale_instance_ids(self, now: float) -> list[int]:
        timeout = self.config.heartbeat_timeout_s
        return sorted(i for i, v in self._views.items() if now - v.seen_at > timeout)

    def tiers(self) -> dict[int, int]:
        return {i: v.tier for i, v in self._views.items()}

    def lendable(self) -> dict[int, int]:
        """Per instance, its estimated lendable blocks net of reservations (at least 0)."""
        return {i: max(0, v.available) for i, v in self._views.items()}

    def check_integrity(self) -> None:
        for i, v in self._views.items():
            assert v.lendable >= 0, f"gmanager: negative lendable for {i}"
            assert v.reserved >= 0, f"gmanager: negative reservation for {i}"

    # ---- internals ----------------------------------------------------------------------

    def _maybe_sort(self, now: float) -> None:
        cfg = self.config
        if (
            self._needs_sort
            or self._heartbeats_since_sort >= cfg.resort_every_heartbeats
            or now - self._sorted_at >= cfg.resort_interval_s
        ):
            deadline = now - cfg.heartbeat_timeout_s
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
            self.num_sorts += 1

    def _split(self, debtor_id: int, num_blocks: int, deadline: float) -> Shares:
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
