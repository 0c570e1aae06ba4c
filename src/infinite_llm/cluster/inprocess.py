"""``InProcessCluster``: every instance in this process, sharing the model weights read-only.

N instances cost N KV pools and one copy of the weights. Each instance has its own pool,
RManager and scheduler; when a home instance runs out of rBlocks its allocator borrows from
creditors recommended by the gManager. Routing, heartbeats, the cluster-wide order,
defragmentation and failures are the cluster core's (``ClusterCore``), run here over direct
calls (``InProcessMembers``): the instances step in turn, each told the others' fresh order
reports, defragmentation copies rBlocks and switches block tables while no step runs, and an
instance can be lost (``fail_instance``) without losing a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.cluster.base import Cluster
from infinite_llm.cluster.core import ClusterCore, Journal
from infinite_llm.cluster.layout import PoolLayout, lender_device
from infinite_llm.cluster.router import InstanceLoad
from infinite_llm.cluster.transport import InProcessTransport
from infinite_llm.config import EngineConfig
from infinite_llm.engine.events import StepEvent
from infinite_llm.engine.instance import Instance
from infinite_llm.engine.model_runner import ModelRunner
from infinite_llm.engine.structured import StructuredOutputs
from infinite_llm.kvcache.gmanager import GManager
from infinite_llm.kvcache.integrity import check_cluster, pool_counts, pool_state
from infinite_llm.kvcache.messages import Heartbeat
from infinite_llm.kvcache.metrics import locality
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.kvcache.prefix import prefix_counters
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.tiers import Tier
from infinite_llm.model.loader import LoadedModel, parse_dtype
from infinite_llm.scheduler.allocator import LocalAllocator
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


class InProcessMembers:
    """The core's ``Members`` for instances in this process: direct calls."""

    def __init__(self, transport: InProcessTransport) -> None:
        self.instances: dict[int, Instance] = {}
        self.homes: dict[str, int] = {}  # request id -> home, for the front end's calls
        self.transport = transport

    def ids(self) -> list[int]:
        return sorted(self.instances)

    def heartbeats(self) -> list[Heartbeat]:
        return [inst.heartbeat() for inst in self.instances.values()]

    def loads(self) -> dict[int, InstanceLoad]:
        """The model instances' (a memory instance homes no request)."""
        return {
            i: InstanceLoad.of(inst.scheduler)
            for i, inst in self.instances.items()
            if not inst.is_memory
        }

    def rmanagers(self) -> dict[int, RManager]:
        return {i: inst.rmanager for i, inst in self.instances.items()}

    def move_blocks(self, relocations: list[Relocation]) -> None:
        # The moves of one cycle swap form a ring: read every source before writing any target.
        data = []
        for src in {r.old.instance_id for r in relocations}:
            moves = [r for r in relocations if r.old.instance_id == src]
            k, v = self.instances[src].read_blocks([r.old.block_id for r in moves])
            data.append((moves, k, v))
        for moves, k, v in data:
            for dst in {r.new.instance_id for r in moves}:
                index = [j for j, r in enumerate(moves) if r.new.instance_id == dst]
                sel = torch.tensor(index, dtype=torch.long)
                self.instances[dst].write_blocks(
                    [moves[j].new.block_id for j in index],
                    k.index_select(2, sel),
                    v.index_select(2, sel),
                )

    def relocate(self, relocations: list[Relocation]) -> int:
        return sum(inst.relocate(relocations) for inst in self.instances.values())

    def remove(self, instance_id: int) -> list[Request]:
        dead = self.instances.pop(instance_id)
        self.transport.detach(instance_id)
        orphans = list(dead.scheduler.requests.values())
        for request in orphans:
            request.block_table.clear()  # its rBlocks were on the dead pool or lent to it
        return orphans

    def drop_instance(self, dead_id: int) -> list[str]:
        return [rid for inst in self.instances.values() for rid in inst.drop_instance(dead_id)]

    def adopt(self, home: int, request: Request) -> None:
        self.instances[home].adopt_request(request)
        self.homes[request.request_id] = home


class InProcessCluster(Cluster):
    """``clock`` and ``journal``: the cluster core's (``ClusterCore``), for replays."""

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        *,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
    ) -> None:
        self.config = config
        cache = config.cache
        self.block_size = cache.block_size
        self.layout = layout = PoolLayout.of(config, loaded.arch)
        self.num_blocks_per_instance = layout.model_blocks
        self.borrowing = layout.borrowing
        lending_cap = layout.lending_cap
        self.gmanager = GManager(config.cluster.gmanager, clock=clock)
        self.transport = InProcessTransport(config.attention_impl)
        self.members = InProcessMembers(self.transport)
        self.instances = self.members.instances
        # the instances step in turn on one device: pack requests into fewer, bigger batches
        self.core = ClusterCore(
            self.members,
            self.gmanager,
            block_size=self.block_size,
            borrowing=self.borrowing,
            routing="pack",
            config=config.cluster,
            clock=clock,
            journal=journal,
            prefix_caching=cache.enable_prefix_caching,
        )
        arch, dtype, device = loaded.arch, parse_dtype(config.dtype), torch.device(config.device)
        # one grammar compiler and cache for the process: the instances step in turn
        structured = StructuredOutputs(lambda: loaded.tokenizer.hf, arch.vocab_size)
        for i in range(config.num_instances):
            pool = KVPool(
                arch.num_layers,
                arch.num_kv_heads,
                arch.head_dim,
                self.num_blocks_per_instance,
                self.block_size,
                dtype,
                device,
            )
            rmanager = RManager(i, self.num_blocks_per_instance, lending_cap=lending_cap)
            allocator = self.core.allocator(
                rmanager,
                self.transport.lend,
                self.transport.release,
            )
            scheduler = Scheduler(config.scheduler, self.block_size, allocator)
            runner = ModelRunner(
                loaded.model, self.block_size, self.transport, config.seed + i, structured
            )
            instance = Instance(i, runner, pool, rmanager, scheduler, config.attention_impl)
            self.instances[i] = instance
            self.transport.attach(instance)
        for lender in layout.lenders:  # memory instances and host pools: no model, lend all
            i, n = lender.instance_id, lender.num_blocks
            where, pinned = lender_device(config.device)
            pool = KVPool(
                arch.num_layers,
                arch.num_kv_heads,
                arch.head_dim,
                n,
                self.block_size,
                dtype,
                where,
                pinned,
            )
            rmanager = RManager(i, n, lending_cap=1.0, tier=lender.tier, host_of=lender.host_of)
            idle = Scheduler(config.scheduler, self.block_size, LocalAllocator(rmanager))
            instance = Instance(i, None, pool, rmanager, idle, config.attention_impl)
            self.instances[i] = instance
            self.transport.attach(instance)
        self.ended_by_failure = []
        self._home = self.members.homes
        self.core.heartbeat(force=True)

    # -- contract ---------------------------------------------------------------------------
    def live_instance_ids(self) -> list[int]:
        return sorted(self.instances)

    def request_needs(self) -> dict[str, int]:
        return {
            rid: r.num_prompt_tokens + r.max_tokens
            for inst in self.instances.values()
            for rid, r in inst.scheduler.requests.items()
        }

    def add_request(self, request: Request, home: int | None = None) -> int:
        if home is None:
            home = self.core.route(
                request.num_tokens, request.request_id, self.core.prefix_hashes(request)
            )
        elif home not in self.instances:
            raise ValueError(f"no live instance {home}")
        self.instances[home].add_request(request)  # refused on a memory instance
        self._home[request.request_id] = home
        return home

    def abort_request(self, request_id: str) -> None:
        home = self._home.pop(request_id, None)
        if home is not None and home in self.instances:
            self.instances[home].abort_request(request_id)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        home = self._home.pop(request_id, None)
        if home is not None and home in self.instances:
            self.instances[home].finish_request(request_id, status)

    def has_unfinished_requests(self) -> bool:
        return any(inst.has_unfinished_requests() for inst in self.instances.values())

    def step(self) -> list[StepEvent]:
        return [event for part in self.step_in_parts() for event in part]

    def step_in_parts(self) -> Iterator[list[StepEvent]]:
        """Every instance in turn (one device), each told the others' fresh order reports;
        each instance's events as soon as it stepped."""
        ended = self.take_failure_events()
        if ended:
            yield ended
        self.core.heartbeat()
        for inst in list(self.instances.values()):
            self.core.grant({i: x.scheduler for i, x in self.instances.items()})
            events = inst.step()
            for event in events:
                if event.finish_reason is not None:
                    self._home.pop(event.request_id, None)
            if events:
                yield events
        self.core.end_step()

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        tables = {
            rid: (req.home_instance_id, req.block_table)
            for inst in self.instances.values()
            for rid, req in inst.scheduler.requests.items()
        }
        loc = locality(tables)
        borrow = self.core.borrow_stats
        latency = borrow.latency.summary()
        g = self.gmanager.stats()
        return {
            "instances": [
                pool_counts(inst.rmanager)
                | {
                    "running": inst.scheduler.num_running,
                    "waiting": inst.scheduler.num_waiting,
                    "preemptions": inst.scheduler.num_preemptions,
                    "block_owners": inst.rmanager.block_owners(),
                    "cached_block_ids": inst.rmanager.cached_block_ids(),
                    "kind": "model" if not inst.is_memory else Tier(inst.rmanager.tier).label,
                    "tier": Tier(inst.rmanager.tier).label,
                }
                | prefix_counters(inst.scheduler.allocator.prefix)
                for _, inst in sorted(self.instances.items())
            ],
            "ledger": [
                {"debtor": d, "creditor": c, "blocks": n}
                for (d, c), n in sorted(self.gmanager.edges().items())
            ],
            "locality": {
                "mean": loc.mean,
                "overall": loc.overall,
                "num_local": loc.num_local_blocks,
                "num_blocks": loc.num_blocks,
            },
            "borrowing": self.borrowing,
            "block_size": self.block_size,
            "false_replies": borrow.num_false_replies,
            "borrows": borrow.num_borrows,
            "borrow_failures": borrow.num_failed,
            "blocks_borrowed": borrow.num_blocks_borrowed,
            "borrow_latency_p50_s": latency.p50_s,
            "borrow_latency_p99_s": latency.p99_s,
            "gmanager_queries": g.num_queries,
            "migrated_blocks": self.core.num_migrated_blocks,
            "defrag_runs": self.core.num_defrag_runs,
            "remote_ma_calls": self.transport.num_shard_calls,
            "failed_instances": self.core.num_failed_instances,
        }

    def check_integrity(self) -> None:
        self.core.heartbeat(force=True)  # the ledger must equal reality after a heartbeat round
        for inst in self.instances.values():
            inst.rmanager.check_integrity()
            inst.scheduler.check_prefix_cache()
        self.gmanager.check_integrity()
        check_cluster(
            [
                pool_state(
                    inst.rmanager,
                    ((rid, r.block_table) for rid, r in inst.scheduler.requests.items()),
                    inst.scheduler.allocator.shared.ref_cnts(),
                )
                for inst in self.instances.values()
            ],
            self.gmanager.edges(),
        )
