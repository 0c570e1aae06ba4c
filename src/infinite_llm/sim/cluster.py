"""``SimCluster``: the real memory managers, borrowing, router and schedulers, without a model.

The same cluster core as ``cluster.inprocess.InProcessCluster`` and the Ray driver
(``cluster.core.ClusterCore``: routing, heartbeats, the cluster-wide order, borrowing's
allocators, defragmentation, failures), over the same ``RManager``, ``GManager`` and
``Scheduler`` code. Only the members differ (``SimMembers``): lends and releases are direct
calls on the creditor's ``RManager``, and there is no KV data, so a migration only switches
block tables (through ``PlacementTracker``). The core and the gManager run on the simulated
clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.cluster.core import ClusterConfig, ClusterCore, Journal
from infinite_llm.cluster.router import InstanceLoad
from infinite_llm.kvcache.gmanager import GManager, GManagerConfig
from infinite_llm.kvcache.integrity import check_cluster, pool_counts, pool_state
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.scheduler import recovery
from infinite_llm.scheduler.request import Request
from infinite_llm.scheduler.scheduler import Scheduler, SchedulerConfig
from infinite_llm.sim.placement import PlacementTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimClusterConfig:
    """The cluster a simulation runs: instances, pools, scheduling, housekeeping timers.

    ``heartbeat_interval_s`` is simulated time. Defragmentation runs every
    ``defrag_every_steps`` cluster steps when instances step in turn (as ``InProcessCluster``
    does), or every ``defrag_interval_s`` of simulated time when each steps on its own clock.
    """

    num_instances: int
    num_blocks_per_instance: int
    block_size: int = 16
    enable_borrowing: bool = True
    lending_cap: float = 1.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    heartbeat_interval_s: float = 0.02
    defrag_every_steps: int = 8
    defrag_interval_s: float = 0.25
    gmanager: GManagerConfig = field(default_factory=GManagerConfig)

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.num_blocks_per_instance < 1 or self.block_size < 1:
            raise ValueError("num_instances, num_blocks_per_instance and block_size must be >= 1")
        if (
            self.heartbeat_interval_s <= 0
            or self.defrag_interval_s <= 0
            or self.defrag_every_steps < 1
        ):
            raise ValueError("heartbeat and defragmentation intervals must be positive")

    @property
    def borrowing(self) -> bool:
        return self.enable_borrowing and self.num_instances > 1

    @property
    def max_request_tokens(self) -> int:
        """The longest context one request may have (the front end refuses longer ones): its home
        pool plus what the others may lend. ``cluster.base.max_request_blocks`` says the same
        (restated so this package imports without torch; a test keeps them equal)."""
        n = self.num_blocks_per_instance
        if not self.borrowing:
            return n * self.block_size
        return (n + (self.num_instances - 1) * int(self.lending_cap * n)) * self.block_size


class SimInstance:
    """One instance's real bookkeeping: its RManager, allocator and Scheduler."""

    def __init__(self, instance_id: int, rmanager: RManager, scheduler: Scheduler) -> None:
        self.instance_id = instance_id
        self.rmanager = rmanager
        self.scheduler = scheduler


class SimMembers:
    """The cluster core's ``Members`` for simulated instances: their managers, no KV data (a
    migration only switches block tables, through ``PlacementTracker``)."""

    def __init__(self, tracker: PlacementTracker) -> None:
        self.instances: dict[int, SimInstance] = {}
        self.tracker = tracker

    def ids(self) -> list[int]:
        return sorted(self.instances)

    def heartbeats(self) -> list[Heartbeat]:
        return [inst.rmanager.heartbeat() for inst in self.instances.values()]

    def loads(self) -> dict[int, InstanceLoad]:
        return {i: InstanceLoad.of(inst.scheduler) for i, inst in self.instances.items()}

    def rmanagers(self) -> dict[int, RManager]:
        return {i: inst.rmanager for i, inst in self.instances.items()}

    def move_blocks(self, relocations: list[Relocation]) -> None:
        """No KV data in the simulator: nothing to copy."""

    def relocate(self, relocations: list[Relocation]) -> int:
        return self.tracker.relocate(relocations)

    def remove(self, instance_id: int) -> list[Request]:
        dead = self.instances.pop(instance_id)
        orphans = list(dead.scheduler.requests.values())
        for request in orphans:
            self.tracker.forget(request)
            request.block_table.clear()
        return orphans

    def drop_instance(self, dead_id: int) -> list[str]:
        lost = []
        for inst in self.instances.values():
            for rid in recovery.drop_instance(inst.rmanager, inst.scheduler, dead_id):
                self.tracker.forget(inst.scheduler.requests[rid])
                lost.append(rid)
        return lost

    def adopt(self, home: int, request: Request) -> None:
        recovery.adopt(self.instances[home].scheduler, home, request)

    # -- the transport: lends and releases are direct calls on the creditor's manager ---------
    def lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        return self.instances[creditor_id].rmanager.lend(request)

    def release(self, creditor_id: int, release: Release) -> None:
        self.instances[creditor_id].rmanager.reclaim(release)


class SimCluster:
    """``journal``: the cluster core's (``ClusterCore``), for replays."""

    def __init__(
        self,
        config: SimClusterConfig,
        clock: Callable[[], float],
        routing: str = "load",
        journal: Journal | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.borrowing = config.borrowing
        lending_cap = config.lending_cap if self.borrowing else 0.0
        self.gmanager = GManager(config.gmanager, clock=clock)
        self.tracker = PlacementTracker()
        self.members = SimMembers(self.tracker)
        self.instances = self.members.instances
        self.core = ClusterCore(
            self.members,
            self.gmanager,
            block_size=self.block_size,
            borrowing=self.borrowing,
            routing=routing,
            config=ClusterConfig(
                config.heartbeat_interval_s, config.defrag_every_steps, config.gmanager
            ),
            clock=clock,
            journal=journal,
        )
        for i in range(config.num_instances):
            rmanager = RManager(i, config.num_blocks_per_instance, lending_cap=lending_cap)
            allocator = self.core.allocator(rmanager, self.members.lend, self.members.release)
            self.instances[i] = SimInstance(
                i, rmanager, Scheduler(config.scheduler, self.block_size, allocator)
            )
        self.max_request_tokens = config.max_request_tokens
        self.core.heartbeat(force=True)

    @property
    def borrow_stats(self) -> BorrowStats:
        return self.core.borrow_stats

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request: Request, home: int | None = None) -> int:
        if home is None:
            home = self.core.route(request.num_tokens, request.request_id)
        request.home_instance_id = home
        self.instances[home].scheduler.add_request(request)
        return home

    def has_unfinished_requests(self) -> bool:
        return any(inst.scheduler.has_unfinished_requests() for inst in self.instances.values())

    def defragment(self) -> list[Relocation]:
        """The gManager's plan now (``ClusterCore.defragment``); the rBlocks moved."""
        return self.core.defragment()

    def grant(self) -> None:
        """Before an instance's schedule: the cluster-wide order and the view's refresh round
        (``ClusterCore.grant``)."""
        self.core.grant({i: x.scheduler for i, x in self.instances.items()})

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        borrow = self.borrow_stats
        g = self.gmanager.stats()
        return {
            "instances": [
                pool_counts(inst.rmanager) | {"preemptions": inst.scheduler.num_preemptions}
                for _, inst in sorted(self.instances.items())
            ],
            "borrowing": self.borrowing,
            "borrows": borrow.num_borrows,
            "borrow_failures": borrow.num_failed,
            "false_replies": borrow.num_false_replies,
            "blocks_borrowed": borrow.num_blocks_borrowed,
            "gmanager_queries": g.num_queries,
            "migrated_blocks": self.core.num_migrated_blocks,
            "defrag_runs": self.core.num_defrag_runs,
            "failed_instances": self.core.num_failed_instances,
            "preemptions": sum(inst.scheduler.num_preemptions for inst in self.instances.values()),
        }

    def check_integrity(self) -> None:
        """The same checks as ``InProcessCluster.check_integrity`` (``kvcache.integrity``), plus
        the placement index against the block tables."""
        self.core.heartbeat(force=True)
        for inst in self.instances.values():
            inst.rmanager.check_integrity()
            inst.scheduler.check_prefix_cache()
        self.gmanager.check_integrity()
        pools = [
            pool_state(
                inst.rmanager,
                ((rid, r.block_table) for rid, r in inst.scheduler.requests.items()),
                inst.scheduler.allocator.shared.ref_cnts(),
            )
            for inst in self.instances.values()
        ]
        check_cluster(pools, self.gmanager.edges())
        num_borrowed = sum(p.num_borrowed for p in pools)
        assert self.tracker.num_borrowed_blocks == num_borrowed, (
            f"placement index holds {self.tracker.num_borrowed_blocks} borrowed rBlocks, tables {num_borrowed}"
        )

    def all_free(self) -> bool:
        """Every pool entirely free, nothing lent or borrowed (after a run drained)."""
        return all(
            inst.rmanager.num_free_blocks == inst.rmanager.num_blocks
            and not inst.rmanager.num_borrowed_blocks
            for inst in self.instances.values()
        )
