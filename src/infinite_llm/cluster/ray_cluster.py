"""``RayCluster``: one Ray actor per instance plus one for the gManager, driven from this process.

Where each message goes::

    driver --add/abort/finish/adopt--> home actor            (routed by the gManager's free view)
    driver --step (all at once)------> every model actor --> StepReply(events, unreachable)
    actor  ==channel (per layer)=====> each creditor actor   (queries + new K,V out; out, lse back)
    actor  --open_channel------------> a creditor actor      (once per pair, on first need)
    actor  --recommend/record_*------> gManager actor        (borrowing; waits for the answer)
    actor  --lend/reclaim------------> creditor actor
    actor  --Heartbeat (timer)-------> gManager actor        (fire and forget, ordered by seq)
    driver --plan, rmanager calls, read/write_blocks, relocate--> actors   (defragmentation)

The driver runs the cluster core (``ClusterCore``: routing, the cluster-wide order, heartbeat
rounds, defragmentation, failures) over the actors (``RayMembers``) and the gManager actor
(``DriverGManager``). The actors step at once, each told the others' order reports of the
last round (``ClusterCore.order_round``). Control calls the driver makes between steps are
collected and awaited before the next step (a threaded actor does not promise to run calls in
the order they were sent). Every ``defrag_interval_steps`` steps the core runs the gManager's
plan live: its bookkeeping goes through ``RemoteRManager`` proxies, then rBlock data is read
from every source, written to every destination and block tables switched; the old copy is
freed by the plan itself (reclaim or repossess).

Faults: an instance actor that dies is found by the next call to it (its step, a peer's MA,
lend or release), confirmed with a ping, then failed by the core as in process: the gManager
forgets it, survivors drop what they lent to it and recompute requests that had rBlocks on
it, and the requests homed on it are rebuilt here from what the driver kept (prompt, outputs
seen in events, sampling parameters, arrival) and re-homed. A seeded random
sampler of a re-homed request restarts from its seed (its generator died with the actor);
greedy requests finish with the same tokens. ``restart_gmanager`` replaces the gManager actor
and rebuilds its ledger from one round of heartbeats (a dead gManager found during a step is
restarted the same way).

The pools come from ``PoolLayout``, as in process: the memory instances and host pools are
actors without the weights (``ray_actor``), a host pool on its model instance's node
(``ray_placement``); never stepped, never a request's home, found dead by the debtors they
fail and failed like any creditor.

Ray itself starts (or is joined) in ``ray_runtime``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError

from infinite_llm.cluster.base import Cluster
from infinite_llm.cluster.channel import remove_channel_dir
from infinite_llm.cluster.core import ClusterCore
from infinite_llm.cluster.layout import PoolLayout
from infinite_llm.cluster.ray_actor import InstanceActor
from infinite_llm.cluster.ray_gmanager import GManagerActor
from infinite_llm.cluster.ray_instance import InstanceSpec
from infinite_llm.cluster.ray_members import DriverGManager, RayMembers, RequestRecord, alive
from infinite_llm.cluster.ray_placement import InstancePlacement
from infinite_llm.cluster.ray_runtime import init_ray
from infinite_llm.cluster.ray_snapshot import InstanceSnapshot, merged_stats
from infinite_llm.config import EngineConfig
from infinite_llm.engine.events import StepEvent
from infinite_llm.kvcache.block import BlockTable
from infinite_llm.kvcache.integrity import check_cluster
from infinite_llm.model.loader import LoadedModel
from infinite_llm.scheduler.order import OrderReport
from infinite_llm.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Every step of an actor runs on one thread of its own: its OpenMP team (each thread that opens
# a parallel region gets one) stays warm from step to step.
STEP_GROUP = {"step": 1}


class RayCluster(Cluster):
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        cache = config.cache
        self.block_size = cache.block_size
        self.layout = layout = PoolLayout.of(config, loaded.arch)
        self.num_blocks_per_instance = layout.model_blocks
        self.borrowing = layout.borrowing
        self.ended_by_failure = []
        # memory instances and host pools: actors without the model, never stepped nor homes
        self.lender_ids = frozenset(x.instance_id for x in layout.lenders)
        self._num_actors = num_actors = config.num_instances + len(layout.lenders)
        cpus = os.cpu_count() or 1
        self._started_ray = init_ray(config.ray_address, max(cpus, num_actors + 1))
        self.max_concurrency = 8 + num_actors  # a step, every peer's MA, lends, probes
        self._token = uuid.uuid4().hex[:12]
        spec = InstanceSpec(
            config, layout.model_blocks, layout.lending_cap, self.borrowing, self._token
        )
        specs = dict.fromkeys(range(config.num_instances), spec) | {
            x.instance_id: spec.for_lender(x) for x in layout.lenders
        }
        actor_class = ray.remote(concurrency_groups=STEP_GROUP)(InstanceActor)
        self._actors: dict[int, Any] = {}
        self.members = RayMembers(self._actors, config.scheduler.max_num_seqs, self.lender_ids)
        self.gmanager = DriverGManager(None)
        self._placement: InstancePlacement | None = None
        try:
            self._placement = InstancePlacement(layout, gpus=config.device.startswith("cuda"))
            self.gmanager.handle = self._new_gmanager()
            self._actors.update(
                {
                    i: actor_class.options(
                        max_concurrency=self.max_concurrency,
                        max_restarts=0,
                        **self._placement.options(i),
                    ).remote(i, spec)
                    for i, spec in specs.items()
                }
            )
            ray.get(
                [
                    a.connect.remote(self._actors, self.gmanager.handle)
                    for a in self._actors.values()
                ]
            )
        except BaseException:
            self.shutdown()
            raise
        # The actors run on their own devices: spread requests by load (``Router``).
        self.core = ClusterCore(
            self.members,
            self.gmanager,
            block_size=self.block_size,
            borrowing=self.borrowing,
            routing="load",
            config=config.cluster,
            prefix_caching=config.cache.enable_prefix_caching,
        )
        self.members.on_dead = self.fail_instance
        self._records = self.members.records
        self._order: dict[int, OrderReport] = {}  # each actor's last report
        self.num_gmanager_restarts = 0
        self.send_heartbeats()

    def _new_gmanager(self) -> Any:
        forgotten = (
            frozenset(range(self._num_actors)) - set(self._actors) if self._actors else frozenset()
        )
        return (
            ray.remote(GManagerActor)
            .options(max_concurrency=8, num_cpus=0, max_restarts=0)
            .remote(forgotten)
        )

    # -- contract ---------------------------------------------------------------------------
    @property
    def instance_ids(self) -> list[int]:
        return sorted(self._actors)

    def live_instance_ids(self) -> list[int]:
        return self.instance_ids

    def request_needs(self) -> dict[str, int]:
        return {
            rid: record.request.num_prompt_tokens + record.request.max_tokens
            for rid, record in self._records.items()
        }

    def add_request(self, request: Request, home: int | None = None) -> int:
        if home is None:
            home = self.core.route(
                request.num_tokens, request.request_id, self.core.prefix_hashes(request)
            )
        elif home not in self._actors:
            raise ValueError(f"no live instance {home}")
        elif home in self.lender_ids:
            raise ValueError(
                f"instance {home} has no model (a memory instance or a host pool): it lends "
                "rBlocks, it does not run requests"
            )
        copy = dataclasses.replace(
            request, block_table=BlockTable(), output_token_ids=list(request.output_token_ids)
        )
        self._records[request.request_id] = RequestRecord(
            copy, home, list(request.output_token_ids), request.num_preemptions
        )
        self.members.pending.append(self._actors[home].add_request.remote(request))
        return home

    def abort_request(self, request_id: str) -> None:
        self._end(request_id, "abort_request")

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        self._end(request_id, "finish_request", status)

    def _end(self, request_id: str, method: str, *args: Any) -> None:
        record = self._records.pop(request_id, None)
        if record is not None and record.home in self._actors:
            self.members.flush()  # it may not have reached its home yet
            self.members.pending.append(
                getattr(self._actors[record.home], method).remote(request_id, *args)
            )

    def has_unfinished_requests(self) -> bool:
        return bool(self._records)

    def step(self) -> list[StepEvent]:
        """Every model actor at once, each told the others' order reports of the last round (an
        actor without the model has nothing to step: it is found dead by the debtors it fails)."""
        self.members.flush()
        none: OrderReport = (None, None, None)
        stepping = {i: a for i, a in self._actors.items() if i not in self.lender_ids}
        told = self.core.order_round({i: self._order.get(i, none) for i in stepping})
        refs = {i: a.step.remote(told[i]) for i, a in stepping.items()}
        events: list[StepEvent] = []
        dead: set[int] = set()
        suspects: set[int] = set()
        gmanager_down = False
        for i, ref in refs.items():
            try:
                reply = ray.get(ref)
            except RayActorError:
                dead.add(i)
                continue
            events.extend(reply.events)
            self._order[i] = reply.order
            suspects.update(reply.unreachable)
            gmanager_down |= reply.gmanager_unreachable
        dead |= {i for i in suspects - dead if i in self._actors and not alive(self._actors[i])}
        self._track(events)
        if dead >= set(stepping):
            raise RuntimeError(f"every model instance actor died ({sorted(dead)})")
        for i in sorted(dead):
            self.fail_instance(i)
        if gmanager_down and not alive(self.gmanager.handle, "instance_ids"):
            self.restart_gmanager()
        self.core.heard_from(self._actors)  # the actors' own heartbeats went out meanwhile
        self.core.end_step()
        return events + self.take_failure_events()

    def _track(self, events: list[StepEvent]) -> None:
        for event in events:
            record = self._records.get(event.request_id)
            if record is None:
                continue
            if event.sampled is not None:
                record.output_token_ids.append(event.sampled.token_id)
            record.num_preemptions = event.num_preemptions
            if event.finish_reason is not None:
                del self._records[event.request_id]

    # -- failures ---------------------------------------------------------------------------
    def kill_instance(self, instance_id: int) -> None:
        """Kill an instance actor without telling anyone (a crash): the next step finds out."""
        ray.kill(self._actors[instance_id], no_restart=True)

    def restart_gmanager(self) -> None:
        """Replace the gManager actor; its ledger is rebuilt from one round of heartbeats."""
        ray.kill(self.gmanager.handle, no_restart=True)
        self.gmanager.handle = self._new_gmanager()
        self.members.gather("set_gmanager", self.gmanager.handle)
        heartbeats = self.members.gather("heartbeat")
        ray.get(self.gmanager.handle.rebuild.remote(list(heartbeats.values())))
        self.num_gmanager_restarts += 1

    def probe(self, num_calls: int = 100, payload_bytes: int = 0) -> dict[str, float]:
        """Actor-to-actor call latency (instance 0 -> 1): median s, bare and with a payload."""
        first, second = self.instance_ids[:2]
        return ray.get(self._actors[first].probe_peer.remote(second, num_calls, payload_bytes))

    # -- introspection ----------------------------------------------------------------------
    def snapshots(self, check: bool = False) -> list[InstanceSnapshot]:
        return [s for _, s in sorted(self.members.gather("snapshot", check).items())]

    def stats(self) -> dict[str, Any]:
        edges = self.gmanager.edges()
        g = ray.get(self.gmanager.handle.stats.remote())
        out = merged_stats(self.snapshots(), edges, g.num_queries, self.borrowing, self.block_size)
        out.update(
            {
                "migrated_blocks": self.core.num_migrated_blocks,
                "defrag_runs": self.core.num_defrag_runs,
                "failed_instances": self.core.num_failed_instances,
            }
        )
        out["ray"]["gmanager_restarts"] = self.num_gmanager_restarts
        out["ray"]["max_concurrency"] = self.max_concurrency
        return out

    def check_integrity(self) -> None:
        self.send_heartbeats()  # the ledger must equal reality after a heartbeat round
        snaps = self.snapshots(check=True)
        ray.get(self.gmanager.handle.check_integrity.remote())
        check_cluster(snaps, self.gmanager.edges())

    def shutdown(self) -> None:
        actors = [*self._actors.values(), self.gmanager.handle]
        closing = [a.close.remote() for a in self._actors.values()]
        with contextlib.suppress(Exception):  # dead actors: their files go below
            ray.get(closing, timeout=10)
        self._actors.clear()
        self.gmanager.handle = None
        for actor in actors:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    logger.debug("kill failed", exc_info=True)
        if self._placement is not None:
            with contextlib.suppress(Exception):
                self._placement.remove()
            self._placement = None
        remove_channel_dir(self._token)  # what a killed actor on this node left
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
