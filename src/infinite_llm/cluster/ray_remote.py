"""Proxies that reach the memory managers of other Ray actors, one awaited call each.

``RemoteGManager`` is the debtor's ``GManagerLike``: every call waits for the gManager actor
(so once a step returns, the ledger has every lend and release of it). With the gManager
unreachable, recommendations are empty, prefill claims are refused (a request longer than its
pool waits for the next gManager), and ledger updates and claim syncs are dropped: the next
gManager rebuilds the ledger from heartbeats, and the claims from the schedulers' next syncs.

``RemoteRManager`` and ``RemoteLedgerSink`` let ``kvcache.migration.execute_plan`` run a
defragmentation plan from the driver on the actors' managers; ``execute_plan_on_actors`` does
that and moves the rBlocks' data between the actors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.claims import Rank
from infinite_llm.kvcache.defrag import DefragPlan
from infinite_llm.kvcache.messages import Heartbeat, Recommendation, Release
from infinite_llm.kvcache.migration import Relocation, execute_plan

logger = logging.getLogger(__name__)


class RemoteGManager:
    """``GManagerLike`` over the gManager actor; ``handle`` is swapped when it restarts.

    An empty recommendation makes it refresh the gManager's view once (``refresh`` pulls a
    heartbeat from every peer; at most once per ``refresh_interval_s``) and ask again. Heartbeats
    race with the debtors' ``record_lend``: one taken just after a lend but delivered before the
    debtor records it makes the gManager count that lend twice, and with memory nearly spent
    that under-estimate alone would refuse a borrow (and preempt a request) that fits.
    """

    def __init__(
        self,
        handle: Any = None,
        refresh: Callable[[], list[Heartbeat]] | None = None,
        refresh_interval_s: float = 0.02,
    ) -> None:
        self.handle = handle
        self.unreachable = False  # a call failed since the last step reply
        self.refresh = refresh
        self.refresh_interval_s = refresh_interval_s
        self.num_refreshes = 0
        self._refreshed_at = float("-inf")

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
        if rec is None:
            return Recommendation(debtor_id, num_blocks)
        now = time.monotonic()
        if (
            rec.is_empty
            and self.refresh is not None
            and now - self._refreshed_at >= self.refresh_interval_s
        ):
            self._refreshed_at = now
            self.num_refreshes += 1
            heartbeats = self.refresh()
            handle = self.handle
            if handle is not None:
                try:
                    ray.get(
                        [handle.on_heartbeat.remote(hb) for hb in heartbeats]
                        + [handle.resort.remote()]
                    )
                except RayActorError:
                    self.unreachable = True
            rec = self._call("recommend", debtor_id, num_blocks) or rec
        return rec

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


class RemoteLedgerSink:
    """Where ``execute_plan`` reports the debts a plan removed: the gManager actor."""

    def __init__(self, gmanager: Any) -> None:
        self._gmanager = gmanager

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        ray.get(self._gmanager.record_release.remote(debtor_id, creditor_id, num_blocks))


def execute_plan_on_actors(
    actors: Mapping[int, Any], gmanager: Any, plan: DefragPlan
) -> list[Relocation]:
    """Run a defragmentation plan's bookkeeping on the actors' RManagers, then copy every moved
    rBlock's data from its source actor to its destination; returns the relocations for the
    block tables (none when the ledger was stale: the next heartbeats refresh it)."""
    managers = {i: RemoteRManager(a) for i, a in actors.items()}
    try:
        relocations = execute_plan(managers, plan, gmanager=RemoteLedgerSink(gmanager))  # type: ignore[arg-type]
    except ValueError as exc:
        logger.debug("defragmentation skipped: %s", exc)
        return []
    # One cycle swap's moves form a ring: read every source before writing any target.
    sources = sorted({r.old.instance_id for r in relocations})
    moves = {s: [r for r in relocations if r.old.instance_id == s] for s in sources}
    data = ray.get(
        [actors[s].read_blocks.remote([r.old.block_id for r in moves[s]]) for s in sources]
    )
    writes = []
    for src, (k, v) in zip(sources, data):
        for dst in sorted({r.new.instance_id for r in moves[src]}):
            index = [j for j, r in enumerate(moves[src]) if r.new.instance_id == dst]
            writes.append(
                actors[dst].write_blocks.remote(
                    [moves[src][j].new.block_id for j in index],
                    (k[0][:, :, index], k[1]),
                    (v[0][:, :, index], v[1]),
                )
            )
    ray.get(writes)
    return relocations
