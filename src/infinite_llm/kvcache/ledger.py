"""DebtLedger: the gManager's global view of who lent how many rBlocks to whom, and of every
instance's free memory as of its last heartbeat.

Loose coherence: the ledger is fed by debtors' reports (``record_lend``/``record_release``) and
corrected by heartbeats, in which each creditor's ``lent_to`` counts are authoritative for
the edges pointing at it. A debtor's ``borrowed_from`` counts fill in edges only for
creditors not heard from yet, so one round of heartbeats rebuilds the whole ledger after a
gManager restart. Nothing here is thread-safe; the ``GManager`` holding it takes the lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from infinite_llm.kvcache.messages import Heartbeat

Edge = tuple[int, int]  # (debtor_id, creditor_id)


class DebtLedger:
    """(debtor_id, creditor_id) -> rBlocks lent, plus the last heartbeat of each instance."""

    def __init__(self) -> None:
        self._edges: dict[Edge, int] = {}
        self._lent_by: dict[int, dict[int, int]] = {}  # creditor -> debtor -> n
        self._heartbeats: dict[int, Heartbeat] = {}
        self._seen_at: dict[int, float] = {}
        self.num_corrections = 0  # releases larger than the recorded debt (stale view)

    # ---- updates ------------------------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat, now: float | None = None) -> bool:
        """Take in a heartbeat (received at ``now``, default: the monotonic clock); False
        (ignored) if it is not newer than one already seen."""
        now = time.monotonic() if now is None else now
        last = self._heartbeats.get(hb.instance_id)
        if last is not None and hb.seq <= last.seq:
            return False
        self._heartbeats[hb.instance_id] = hb
        self._seen_at[hb.instance_id] = now
        # The creditor is the authority over its blocks: its counts replace ours.
        for debtor_id in list(self._lent_by.get(hb.instance_id, {})):
            self._set(debtor_id, hb.instance_id, 0)
        for debtor_id, n in hb.lent_to.items():
            self._set(debtor_id, hb.instance_id, n)
        for creditor_id, n in hb.borrowed_from.items():
            if creditor_id not in self._heartbeats:
                self._set(hb.instance_id, creditor_id, n)
        return True

    def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        _check_edge(debtor_id, creditor_id, num_blocks)
        self._set(debtor_id, creditor_id, self.lent(debtor_id, creditor_id) + num_blocks)

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> int:
        """Lower a debt; returns how much was removed (less than asked if the view was stale)."""
        _check_edge(debtor_id, creditor_id, num_blocks)
        current = self.lent(debtor_id, creditor_id)
        removed = min(current, num_blocks)
        if removed < num_blocks:
            self.num_corrections += 1
        self._set(debtor_id, creditor_id, current - removed)
        return removed

    def forget_instance(self, instance_id: int) -> None:
        """Drop an instance that died: its heartbeat and every edge touching it."""
        self._heartbeats.pop(instance_id, None)
        self._seen_at.pop(instance_id, None)
        for debtor_id, creditor_id in [e for e in self._edges if instance_id in e]:
            self._set(debtor_id, creditor_id, 0)

    def reset(self) -> None:
        self._edges.clear()
        self._lent_by.clear()
        self._heartbeats.clear()
        self._seen_at.clear()

    def rebuild(self, heartbeats: Iterable[Heartbeat], now: float | None = None) -> None:
        """Start over from one round of heartbeats (a restarted gManager)."""
        self.reset()
        for hb in heartbeats:
            self.on_heartbeat(hb, now)

    # ---- queries ------------------------------------------------------------------------

    def lent(self, debtor_id: int, creditor_id: int) -> int:
        return self._edges.get((debtor_id, creditor_id), 0)

    def edges(self) -> dict[Edge, int]:
        """A copy of every non-zero (debtor_id, creditor_id) -> rBlocks lent."""
        return dict(self._edges)

    def lent_by(self, creditor_id: int) -> dict[int, int]:
        return dict(self._lent_by.get(creditor_id, {}))

    def borrowed_by(self, debtor_id: int) -> dict[int, int]:
        return {c: n for (d, c), n in self._edges.items() if d == debtor_id}

    @property
    def num_remote_blocks(self) -> int:
        return sum(self._edges.values())

    def instance_ids(self) -> list[int]:
        return sorted(self._heartbeats)

    def heartbeat(self, instance_id: int) -> Heartbeat | None:
        return self._heartbeats.get(instance_id)

    def free_blocks(self) -> dict[int, int]:
        """instance_id -> free blocks as of its last heartbeat."""
        return {i: hb.num_free for i, hb in self._heartbeats.items()}

    def age(self, instance_id: int, now: float) -> float:
        """Seconds since the instance's last heartbeat (inf: never heard from)."""
        seen = self._seen_at.get(instance_id)
        return math.inf if seen is None else now - seen

    def is_stale(self, instance_id: int, now: float, timeout_s: float) -> bool:
        return self.age(instance_id, now) > timeout_s

    def discrepancies(self) -> dict[Edge, tuple[int, int]]:
        """Edges where the creditor's and the debtor's last heartbeats disagree:
        (debtor, creditor) -> (lent per creditor, borrowed per debtor). Transient while
        lends are in flight; lasting ones point at a leak."""
        pairs: set[Edge] = set()
        for i, hb in self._heartbeats.items():
            pairs.update((d, i) for d in hb.lent_to)
            pairs.update((i, c) for c in hb.borrowed_from)
        out: dict[Edge, tuple[int, int]] = {}
        for d, c in pairs:
            hb_d, hb_c = self._heartbeats.get(d), self._heartbeats.get(c)
            if hb_d is None or hb_c is None:
                continue  # one side unheard: nothing to compare yet
            lent, borrowed = hb_c.lent_to.get(d, 0), hb_d.borrowed_from.get(c, 0)
            if lent != borrowed:
                out[(d, c)] = (lent, borrowed)
        return out

    def check_integrity(self) -> None:
        for (d, c), n in self._edges.items():
            assert d != c, f"ledger: self-edge on instance {d}"
            assert n > 0, f"ledger: non-positive edge {d}->{c}: {n}"
            assert self._lent_by.get(c, {}).get(d) == n, f"ledger: index out of sync at {d}->{c}"
        indexed = sum(len(m) for m in self._lent_by.values())
        assert indexed == len(self._edges), "ledger: creditor index has extra entries"

    # ---- internals ----------------------------------------------------------------------

    def _set(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        if num_blocks > 0:
            self._edges[(debtor_id, creditor_id)] = num_blocks
            self._lent_by.setdefault(creditor_id, {})[debtor_id] = num_blocks
            return
        self._edges.pop((debtor_id, creditor_id), None)
        by_debtor = self._lent_by.get(creditor_id)
        if by_debtor is not None:
            by_debtor.pop(debtor_id, None)
            if not by_debtor:
                del self._lent_by[creditor_id]


def _check_edge(debtor_id: int, creditor_id: int, num_blocks: int) -> None:
    if debtor_id == creditor_id:
        raise ValueError(f"instance {debtor_id} cannot owe itself")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be > 0, got {num_blocks}")


def edges_of(source: DebtLedger | Mapping[Edge, int]) -> dict[Edge, int]:
    """Non-zero edges of a ledger or of a plain (debtor, creditor) -> n mapping."""
    raw = source.edges() if isinstance(source, DebtLedger) else source
    for (d, c), n in raw.items():
        if d == c or n < 0:
            raise ValueError(f"bad debt edge {d}->{c}: {n}")
    return {e: n for e, n in raw.items() if n > 0}
