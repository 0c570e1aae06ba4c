"""``GManagerActor``: the gManager in its own Ray actor, deaf to instances it has forgotten."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from infinite_llm.kvcache.claims import Rank
from infinite_llm.kvcache.gmanager import GManager
from infinite_llm.kvcache.messages import Heartbeat


class GManagerActor(GManager):
    """The gManager in its own actor. Heartbeats are fire and forget, so one sent before an
    instance was failed can arrive after ``forget_instance``: whatever it says about a forgotten
    instance is dropped (else a dead creditor's debt would come back into the ledger for good).
    A prefill claim or sync from a forgotten instance is dropped too (else its stale claim would
    hold back every other long request for good)."""

    def __init__(self, forgotten: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self._forgotten = set(forgotten)

    def forget_instance(self, instance_id: int) -> None:
        self._forgotten.add(instance_id)
        super().forget_instance(instance_id)

    def claim_prefill(self, instance_id: int, rank: Rank) -> bool:
        return instance_id not in self._forgotten and super().claim_prefill(instance_id, rank)

    def sync_prefills(self, instance_id: int, ranks: Iterable[Rank]) -> None:
        if instance_id not in self._forgotten:
            super().sync_prefills(instance_id, ranks)

    def on_heartbeat(self, hb: Heartbeat) -> None:
        clean = self._clean(hb)
        if clean is not None:
            super().on_heartbeat(clean)

    def rebuild(self, heartbeats: Iterable[Heartbeat]) -> None:
        super().rebuild(c for c in map(self._clean, heartbeats) if c is not None)

    def _clean(self, hb: Heartbeat) -> Heartbeat | None:
        dead = self._forgotten
        if hb.instance_id in dead:
            return None
        if dead & (hb.lent_to.keys() | hb.borrowed_from.keys()):
            hb = dataclasses.replace(
                hb,
                lent_to={i: n for i, n in hb.lent_to.items() if i not in dead},
                borrowed_from={i: n for i, n in hb.borrowed_from.items() if i not in dead},
            )
        return hb
