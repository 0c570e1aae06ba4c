"""``SimCluster``: the real memory managers, borrowing, router and schedulers, without a model.

Wired exactly like ``cluster.inprocess.InProcessCluster``: one ``RManager`` per instance
(lending cap 0 without borrowing), a ``Borrower`` over the one ``GManager`` as each
scheduler's allocator when borrowing (the plain ``RManager`` otherwise, the vLLM-style
baseline), a ``Scheduler`` per instance, the ``Router`` on the gManager's free-memory view,
heartbeats into the gManager, and the gManager's defragmentation plans run by
``execute_plan``. Only the transport differs: lends and releases are direct calls on the
creditor's ``RManager`` (what ``InProcessTransport`` does through the ``Instance``), and there
is no KV data, so a migration only switches block tables (through ``PlacementTracker``).
The gManager runs on the simulated clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.cluster.router import Router
from infinite_llm.kvcache.borrow import Borrower, RefreshOnEmpty
from infinite_llm.kvcache.gmanager import GManager
from infinite_llm.kvcache.integrity import check_cluster, pool_counts, pool_state
from infinite_llm.kvcache.messages import LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.migration import Relocation, execute_plan
from infinite_llm.kvcache.rmanager import RManager
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


class SimCluster:
    def __init__(
        self, config: SimClusterConfig, clock: Callable[[], float], routing: str = "load"
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.borrowing = config.borrowing
        lending_cap = config.lending_cap if self.borrowing else 0.0
        self._clock = clock
        self.last_heartbeat_s = float("-inf")
        self.gmanager = GManager(clock=clock)
        self.router = Router(self.block_size, policy=routing)
        self.borrow_stats = BorrowStats()
        self.tracker = PlacementTracker()
        self.instances: dict[int, SimInstance] = {}
        # As InProcessCluster: a failed borrow refreshes the gManager's view once a step.
        self.views = RefreshOnEmpty(self.gmanager, self.send_heartbeats)
        for i in range(config.num_instances):
            rmanager = RManager(i, config.num_blocks_per_instance, lending_cap=lending_cap)
            allocator = (
                Borrower(rmanager, self.views, self._lend, self._release, stats=self.borrow_stats)
                if self.borrowing
                else rmanager
            )
            self.instances[i] = SimInstance(
                i, rmanager, Scheduler(config.scheduler, self.block_size, allocator)
            )
        self.max_request_tokens = config.max_request_tokens
        self.num_migrated_blocks = 0
        self.num_defrag_runs = 0
        self.send_heartbeats()

    # -- the transport: direct calls on the creditor's manager -------------------------------
    def _lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        return self.instances[creditor_id].rmanager.lend(request)

    def _release(self, creditor_id: int, release: Release) -> None:
        self.instances[creditor_id].rmanager.reclaim(release)

    # -- requests ---------------------------------------------------------------------------
    def route(self, num_tokens: int) -> int:
        schedulers = {i: inst.scheduler for i, inst in self.instances.items()}
        return self.router.route(schedulers, self.gmanager, num_tokens, self.borrowing)

    def add_request(self, request: Request, home: int | None = None) -> int:
        if home is None:
            home = self.route(request.num_tokens)
        request.home_instance_id = home
        self.instances[home].scheduler.add_request(request)
        return home

    def has_unfinished_requests(self) -> bool:
        return any(inst.scheduler.has_unfinished_requests() for inst in self.instances.values())

    # -- housekeeping -----------------------------------------------------------------------
    def send_heartbeats(self) -> None:
        self.last_heartbeat_s = self._clock()
        for i, inst in self.instances.items():
            self.gmanager.on_heartbeat(inst.rmanager.heartbeat())
            self.router.on_heartbeat(i)

    def defragment(self) -> list[Relocation]:
        """Run the gManager's plan now; returns the rBlocks moved (none on a stale ledger)."""
        if not any(self.gmanager.edges().values()):
            return []  # nothing borrowed: no cycle to swap, nothing to bring home
        self.send_heartbeats()
        plan = self.gmanager.plan_defragmentation(with_repatriation=True)
        if plan.is_empty:
            return []
        managers = {i: inst.rmanager for i, inst in self.instances.items()}
        try:
            relocations = execute_plan(managers, plan, gmanager=self.gmanager)
        except ValueError as exc:  # the ledger was stale: try again after the next heartbeats
            logger.debug("defragmentation skipped: %s", exc)
            return []
        moved = self.tracker.relocate(relocations)
        self.num_migrated_blocks += moved
        self.num_defrag_runs += bool(moved)
        self.send_heartbeats()
        return relocations

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
            "migrated_blocks": self.num_migrated_blocks,
            "defrag_runs": self.num_defrag_runs,
            "preemptions": sum(inst.scheduler.num_preemptions for inst in self.instances.values()),
        }

    def check_integrity(self) -> None:
        """The same checks as ``InProcessCluster.check_integrity`` (``kvcache.integrity``), plus
        the placement index against the block tables."""
        self.send_heartbeats()
        for inst in self.instances.values():
            inst.rmanager.check_integrity()
        self.gmanager.check_integrity()
        pools = [
            pool_state(
                inst.rmanager, ((rid, r.block_table) for rid, r in inst.scheduler.requests.items())
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
