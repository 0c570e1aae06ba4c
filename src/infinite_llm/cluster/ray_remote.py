"""Proxies that reach the memory managers of other Ray actors, one awaited call each.

``RemoteGManager`` is the debtor's ``GManagerLike``: every call waits for the gManager actor
(so once a step returns, the ledger has every lend and release of it). With the gManager
unreachable, recommendations are empty, prefill claims are refused (a request longer than its
pool waits for the next gManager), and ledger updates and claim syncs are dropped: the next
gManager rebuilds the ledger from heartbeats, and the claims from the schedulers' next syncs.

``RemoteRManager`` lets the cluster core run a defragmentation plan
(``kvcache.migration.execute_plan``) from the driver on the actors' managers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import ray
from ray.exceptions import RayActorError

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.claims import Rank
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Recommendation, Release

logger = logging.getLogger(__name__)


class RemoteGManager:
    """``GManagerLike`` over the gManager actor; ``handle`` is swapped when it restarts. The
    debtor wraps it in ``kvcache.borrow.RefreshOnEmpty`` like every runtime: an empty answer
    refreshes the gManager's view once a step (``push_heartbeats``) and asks again."""

    def __init__(self, handle: Any = None) -> None:
        self.handle = handle
        self.unreachable = False  # a call failed since the last step reply

    def _call(self, method: str, *args: Any) -> Any:
        handle = self.handle
        if handle is None:
            self.unreachable = True
            return None
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except RayActorError:
            self.unreachable = True
            return None

    def recommend(self, debtor_id: int, num_blocks: int) -> Recommendation:
        rec = self._call("recommend", debtor_id, num_blocks)
        return Recommendation(debtor_id, num_blocks) if rec is None else rec

    def resort(self) -> None:
        self._call("resort")

    def push_heartbeats(self, heartbeats: list[Heartbeat]) -> None:
        """Heartbeats into the gManager, awaited. They race with the debtors' ``record_lend``:
        one taken just after a lend but delivered before the debtor records it makes the
        gManager count that lend twice, which only a later heartbeat corrects."""
        handle = self.handle
        if handle is None:
            return
        try:
            ray.get([handle.on_heartbeat.remote(hb) for hb in heartbeats])
        except RayActorError:
            self.unreachable = True

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool:
        """``GManager.can_lend``; False where the gManager cannot be reached."""
        return bool(self._call("can_lend", debtor_id, num_blocks))

    def claim_prefill(self, instance_id: int, rank: Rank) -> bool:
        """``GManager.claim_prefill``; refused where the gManager cannot be reached."""
        return bool(self._call("claim_prefill", instance_id, rank))

    def sync_prefills(self, instance_id: int, ranks: Collection[Rank]) -> None:
        self._call("sync_prefills", instance_id, list(ranks))

    def prefill_way(self, instance_id: int) -> Rank | None:
        """``GManager.prefill_way``; None where the gManager cannot be reached."""
        way = self._call("prefill_way", instance_id)
        return None if way is None else (way[0], way[1])

    def report_false(self, creditor_id: int, num_lendable: int = 0) -> None:
        self._call("report_false", creditor_id, num_lendable)

    def prefix_holders(self, hashes: list[bytes]) -> list[tuple[int, ...]]:
        """``GManager.prefix_holders``; nobody where the gManager cannot be reached."""
        return self._call("prefix_holders", list(hashes)) or []

    def record_lend(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        self._call("record_lend", debtor_id, creditor_id, num_blocks)

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        self._call("record_release", debtor_id, creditor_id, num_blocks)

    def send_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Fire and forget: an overtaken heartbeat is ignored by its ``seq``."""
        handle = self.handle
        if handle is not None:
            handle.on_heartbeat.remote(heartbeat)


class RemoteRManager:
    """The RManager calls of ``execute_plan``, each sent to the instance actor that owns it."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(self._actor.rmanager_call.remote(method, *args))

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        return self._call("allocate", num_blocks)

    def reclaim(self, release: Release) -> None:
        self._call("reclaim", release)

    def lend(self, request: LendRequest) -> LendReply:
        return self._call("lend", request)

    def new_lend_request(self, num_blocks: int) -> LendRequest:
        return self._call("new_lend_request", num_blocks)

    def record_borrowed(self, refs: list[BlockRef]) -> None:
        self._call("record_borrowed", list(refs))

    def repossess(self, debtor_id: int, refs: list[BlockRef]) -> None:
        self._call("repossess", debtor_id, list(refs))

    def record_returned(self, refs: list[BlockRef]) -> None:
        self._call("record_returned", list(refs))

    def lent_refs(self, debtor_id: int | None = None) -> list[BlockRef]:
        return self._call("lent_refs", debtor_id)

    def borrowed_refs(self, creditor_id: int | None = None) -> list[BlockRef]:
        return self._call("borrowed_refs", creditor_id)

    def has_borrowed(self, refs: list[BlockRef]) -> bool:
        return self._call("has_borrowed", list(refs))
