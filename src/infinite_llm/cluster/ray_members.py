"""The cluster core's view of Ray: ``RayMembers`` reaches the instance actors, ``DriverGManager``
the gManager actor, each call awaited by the driver.

The driver keeps a record of every live request (``RequestRecord``: what it was submitted
with, its home, the tokens seen in step events) to rebuild it if its home dies and to give the
router its load signal. A call to a dead actor is found by ``gather`` and the instance failed
through ``on_dead`` (the core's ``fail_instance``), then the call is made again to the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from infinite_llm.cluster.ray_remote import RemoteRManager
from infinite_llm.cluster.router import InstanceLoad
from infinite_llm.kvcache.block import BlockTable
from infinite_llm.kvcache.messages import Heartbeat
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0


@dataclass
class RequestRecord:
    """What the driver keeps of a live request to rebuild it if its home dies."""

    request: Request  # as submitted (a copy: the live one is in the home actor)
    home: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0

    @property
    def pending_tokens(self) -> int:
        """The router's load signal as the driver sees it: the whole prompt until the first token
        comes back (prefill progress stays in the actor), then the output still to generate."""
        prompt = 0 if self.output_token_ids else self.request.num_prompt_tokens
        return prompt + max(0, self.request.max_tokens - len(self.output_token_ids))

    def rebuild(self) -> Request:
        return dataclasses.replace(
            self.request,
            output_token_ids=list(self.output_token_ids),
            num_preemptions=self.num_preemptions,
            block_table=BlockTable(),
            num_computed_tokens=0,
            status=RequestStatus.WAITING,
            generator=None,
        )


def alive(actor: Any, method: str = "ping") -> bool:
    """Whether ``actor`` answers a cheap ``method`` call (a slow answer counts as alive)."""
    try:
        ray.get(getattr(actor, method).remote(), timeout=PING_TIMEOUT_S)
    except RayActorError:
        return False
    except GetTimeoutError:
        logger.warning(
            "an actor did not answer a ping within %.0fs; taken as alive", PING_TIMEOUT_S
        )
    return True


class DriverGManager:
    """The gManager actor as the cluster core sees it; ``handle`` is swapped on a restart."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.handle, method).remote(*args, **kwargs))

    def on_heartbeat(self, hb: Heartbeat) -> None:
        self._call("on_heartbeat", hb)

    def free_blocks(self) -> dict[int, int]:
        return self._call("free_blocks")

    def available(self, instance_id: int) -> int | None:
        return self._call("available", instance_id)

    def edges(self) -> dict[tuple[int, int], int]:
        return self._call("edges")

    def plan_defragmentation(self, with_repatriation: bool = True) -> Any:
        return self._call("plan_defragmentation", with_repatriation=with_repatriation)

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None:
        self._call("record_release", debtor_id, creditor_id, num_blocks)

    def forget_instance(self, instance_id: int) -> None:
        self._call("forget_instance", instance_id)

    def resort(self) -> None:
        self._call("resort")

    def recommend(self, debtor_id: int, num_blocks: int) -> Any:
        return self._call("recommend", debtor_id, num_blocks)

    def can_lend(self, debtor_id: int, num_blocks: int) -> bool:
        return self._call("can_lend", debtor_id, num_blocks)

    def prefix_matches(self, hashes: list[bytes]) -> dict[int, int]:
        return self._call("prefix_matches", hashes)


class RayMembers:
    """The cluster core's ``Members`` over instance actors (calls awaited by the driver)."""

    def __init__(
        self, actors: dict[int, Any], max_num_seqs: int, lender_ids: frozenset[int] = frozenset()
    ) -> None:
        self.actors = actors
        self.max_num_seqs = max_num_seqs
        self.lender_ids = lender_ids  # actors without the model: never a request's home
        self.records: dict[str, RequestRecord] = {}
        self.pending: list[Any] = []  # control calls sent since the last step
        self.on_dead: Callable[[int], object] = lambda i: None  # fails an instance found dead

    # -- driver's calls -----------------------------------------------------------------------
    def flush(self) -> None:
        """Await the control calls sent since the last step (a threaded actor does not promise
        to run them in the order they were sent; a dead home's requests are re-homed next)."""
        pending, self.pending = self.pending, []
        for ref in pending:
            with contextlib.suppress(RayActorError):
                ray.get(ref)

    def gather(self, method: str, *args: Any) -> dict[int, Any]:
        """Call every live instance actor at once; fail the ones found dead and call again."""
        while True:
            self.flush()
            refs = {i: getattr(a, method).remote(*args) for i, a in self.actors.items()}
            out, dead = {}, []
            for i, ref in refs.items():
                try:
                    out[i] = ray.get(ref)
                except RayActorError:
                    dead.append(i)
            if not dead:
                return out
            for i in dead:
                self.on_dead(i)

    # -- Members ------------------------------------------------------------------------------
    def ids(self) -> list[int]:
        return sorted(self.actors)

    def heartbeats(self) -> list[Heartbeat]:
        return list(self.gather("heartbeat").values())

    def loads(self) -> dict[int, InstanceLoad]:
        """The model actors' (a memory instance or host pool homes no request)."""
        homes = [i for i in self.actors if i not in self.lender_ids]
        pending = dict.fromkeys(homes, 0)
        unfinished = dict.fromkeys(homes, 0)
        for record in self.records.values():
            if record.home in pending:
                pending[record.home] += record.pending_tokens
                unfinished[record.home] += 1
        return {i: InstanceLoad(pending[i], unfinished[i], self.max_num_seqs) for i in homes}

    def rmanagers(self) -> dict[int, RemoteRManager]:
        return {i: RemoteRManager(a) for i, a in self.actors.items()}

    def move_blocks(self, relocations: list[Relocation]) -> None:
        # One cycle swap's moves form a ring: read every source before writing any target.
        sources = sorted({r.old.instance_id for r in relocations})
        moves = {s: [r for r in relocations if r.old.instance_id == s] for s in sources}
        data = ray.get(
            [self.actors[s].read_blocks.remote([r.old.block_id for r in moves[s]]) for s in sources]
        )
        writes = []
        for src, (k, v) in zip(sources, data):
            for dst in sorted({r.new.instance_id for r in moves[src]}):
                index = [j for j, r in enumerate(moves[src]) if r.new.instance_id == dst]
                writes.append(
                    self.actors[dst].write_blocks.remote(
                        [moves[src][j].new.block_id for j in index],
                        (k[0][:, :, index], k[1]),
                        (v[0][:, :, index], v[1]),
                    )
                )
        ray.get(writes)

    def relocate(self, relocations: list[Relocation]) -> int:
        return sum(self.gather("relocate", relocations).values())

    def remove(self, instance_id: int) -> list[Request]:
        actor = self.actors.pop(instance_id)
        with contextlib.suppress(Exception):  # already dead
            ray.kill(actor, no_restart=True)
        return [r.rebuild() for r in self.records.values() if r.home == instance_id]

    def drop_instance(self, dead_id: int) -> list[str]:
        return [rid for lost in self.gather("drop_instance", dead_id).values() for rid in lost]

    def adopt(self, home: int, request: Request) -> None:
        self.records[request.request_id].home = home
        self.pending.append(self.actors[home].adopt_request.remote(request))
        self.flush()
