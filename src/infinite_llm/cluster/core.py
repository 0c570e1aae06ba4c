"""``ClusterCore``: every policy that spans instances, one implementation for every runtime.

Routing, heartbeats, the cluster-wide order of the schedulers, borrowing's allocators and their
refresh rounds, defragmentation and failure handling are written here once. The in-process
cluster, the Ray driver and the simulator each run this core over ``Members``, their way of
reaching the instances (direct calls; Ray actor calls; the simulator's bookkeeping, which has
no KV data to move), and a clock (the simulator's is virtual). So the simulator runs the
runtime's own decisions, and a fix to a policy is a fix everywhere.

What stays with each runtime is how a step runs: in turn on one device (in process, the
simulator's serial execution; ``grant`` before each instance's step hands it the others'
fresh order reports), or at once on separate devices (Ray; ``order_round`` from the reports
of the last round). A request longer than its home pool is admitted only with the gManager's
prefill claim (``kvcache.claims``), the one decision taken at once in one place, so two such
requests never start in the same round even where instances step at the same time.

Pure Python (no torch): the simulator imports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from infinite_llm.cluster.router import InstanceLoad, Router
from infinite_llm.kvcache.borrow import Borrower, RefreshOnEmpty, SendLend, SendRelease
from infinite_llm.kvcache.gmanager import GManagerConfig
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.migration import Relocation, execute_plan
from infinite_llm.kvcache.prefix import block_hashes
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.scheduler.allocator import LocalAllocator
from infinite_llm.scheduler.order import Ordered, OrderReport, cluster_order, grant_right_of_way
from infinite_llm.scheduler.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Housekeeping across instances: heartbeat rounds at most every ``heartbeat_interval_s``
    of the cluster's clock (a failed borrow forces one), defragmentation every
    ``defrag_interval_steps`` cluster steps, and how the gManager ranks creditors."""

    heartbeat_interval_s: float = 0.02
    defrag_interval_steps: int = 8
    gmanager: GManagerConfig = field(default_factory=GManagerConfig)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s < 0 or self.defrag_interval_steps < 1:
            raise ValueError("heartbeat_interval_s must be >= 0, defrag_interval_steps >= 1")


class Members(Protocol):
    """How the core reaches a runtime's instances."""

    def ids(self) -> list[int]:
        """The live instances, sorted."""
        ...

    def heartbeats(self) -> list[Heartbeat]:
        """A heartbeat from every live instance, now."""
        ...

    def loads(self) -> dict[int, InstanceLoad]:
        """Per live instance, the router's view of its work."""
        ...

    def rmanagers(self) -> Mapping[int, Any]:
        """Per live instance, its RManager (or a proxy) for a defragmentation plan."""
        ...

    def move_blocks(self, relocations: list[Relocation]) -> None:
        """Copy the moved rBlocks' data (every source read before any target is written)."""
        ...

    def relocate(self, relocations: list[Relocation]) -> int:
        """Point the block tables at the moved rBlocks; how many entries moved."""
        ...

    def remove(self, instance_id: int) -> list[Request]:
        """Take a failed instance out (stop it, stop calling it); the requests homed there,
        their rBlocks gone, to be re-homed."""
        ...

    def drop_instance(self, dead_id: int) -> list[str]:
        """Every survivor forgets what it lent to or borrowed from ``dead_id`` and recomputes
        its requests that had rBlocks there; their ids."""
        ...

    def adopt(self, home: int, request: Request) -> None:
        """``home`` takes over a request of a failed instance (recomputed from its tokens)."""
        ...


class GManagerView(Protocol):
    """What the core needs of the gManager (the ``GManager`` or a proxy to a remote one)."""

    def on_heartbeat(self, hb: Heartbeat) -> None: ...

    def free_blocks(self) -> dict[int, int]: ...

    def prefix_matches(self, hashes: list[bytes]) -> dict[int, int]: ...

    def available(self, instance_id: int) -> int | None: ...

    def edges(self) -> dict[tuple[int, int], int]: ...

    def plan_defragmentation(self, with_repatriation: bool = True) -> Any: ...

    def record_release(self, debtor_id: int, creditor_id: int, num_blocks: int) -> None: ...

    def forget_instance(self, instance_id: int) -> None: ...


Journal = list[tuple[Any, ...]]  # decisions in the order taken: ("home" | "borrow" | ...)


class ClusterCore:
    """The policies across instances (module docstring), run over ``members``.

    ``journal``, when given, gets every decision in the order taken, each with the number of
    cluster steps done before it: ``(kind, steps, ...)`` with ``("home", steps, request_id,
    instance)``, ``("borrow", steps, debtor, creditor, num_blocks)``, ``("migrate", steps,
    old, new)``, ``("fail", steps, instance)``; two runtimes that decide alike write the same
    journal.
    """

    def __init__(
        self,
        members: Members,
        gmanager: Any,
        *,
        block_size: int,
        borrowing: bool,
        routing: str,
        config: ClusterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        prefix_caching: bool = False,
    ) -> None:
        config = config or ClusterConfig()
        self.members = members
        self.gmanager = gmanager
        self.borrowing = borrowing
        self.prefix_caching = prefix_caching
        self.router = Router(block_size, policy=routing)
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.defrag_interval_steps = config.defrag_interval_steps
        self.journal = journal
        self._clock = clock
        self.last_heartbeat_s = float("-inf")
        # A failed borrow refreshes the gManager's view once a step (a forced heartbeat round).
        self.views = RefreshOnEmpty(gmanager, lambda: self.heartbeat(force=True))
        self.borrow_stats = BorrowStats()
        self.num_steps = 0
        self.num_migrated_blocks = 0
        self.num_defrag_runs = 0
        self.num_failed_instances = 0

    # -- requests -----------------------------------------------------------------------------
    def route(
        self, num_tokens: int, request_id: str | None = None, hashes: Sequence[bytes] = ()
    ) -> int:
        """The home of a new request of ``num_tokens`` (``Router``); ``hashes``: its leading
        full rBlocks' (``kvcache.prefix``), to weigh where they are cached."""
        pooled = self.borrowing
        loads = self.members.loads()
        free = self.gmanager.free_blocks()
        lendable = (
            {i: self.gmanager.available(i) or 0 for i in loads}
            if pooled and self.router.policy == "pack"
            else {}
        )
        cached = self.gmanager.prefix_matches(list(hashes)) if hashes else {}
        home = self.router.route(loads, free, lendable, num_tokens, pooled, cached)
        self._record("home", request_id, home)
        return home

    def allocator(
        self,
        rmanager: RManager,
        send_lend: SendLend,
        send_release: SendRelease,
    ) -> Borrower | LocalAllocator:
        """Where an instance's scheduler gets rBlocks: its RManager alone, or with borrowing a
        ``Borrower`` over the core's refreshing view of the gManager; with ``prefix_caching``,
        reusing cached prefixes (``kvcache.prefix``; with borrowing, other instances' too)."""
        prefix_block_size = self.router.block_size if self.prefix_caching else None
        if not self.borrowing:
            return LocalAllocator(rmanager, prefix_block_size=prefix_block_size)

        def lend(creditor_id: int, request: LendRequest) -> LendReply:
            reply = send_lend(creditor_id, request)
            if reply.granted:
                self._record("borrow", request.debtor_id, creditor_id, len(reply.granted))
            return reply

        return Borrower(
            rmanager,
            self.views,
            lend,
            send_release,
            stats=self.borrow_stats,
            prefix_block_size=prefix_block_size,
        )

    def prefix_hashes(self, request: Request) -> list[bytes]:
        """The hashes ``route`` weighs for ``request``: its full rBlocks but the last token's
        (none when prefix caching is off)."""
        if not self.prefix_caching:
            return []
        bs = self.router.block_size
        return block_hashes(request, (request.num_tokens - 1) // bs, bs)

    # -- one step -----------------------------------------------------------------------------
    def grant(self, schedulers: Mapping[int, Ordered]) -> None:
        """Before one instance steps (instances stepping in turn): every scheduler told the
        others' fresh order reports, and the view armed to refresh once if a borrow finds
        nothing."""
        if self.borrowing:
            grant_right_of_way(schedulers)
            self.views.arm()

    def order_round(self, reports: Mapping[int, OrderReport]) -> dict[int, OrderReport]:
        """For instances stepping at once: what each is told, from the others' last reports."""
        none: OrderReport = (None, None, None)
        if not self.borrowing:
            return dict.fromkeys(reports, none)
        return cluster_order(reports)

    def end_step(self) -> list[Relocation]:
        """After a cluster step: defragment every ``defrag_interval_steps`` steps."""
        self.num_steps += 1
        if self.borrowing and self.num_steps % self.defrag_interval_steps == 0:
            return self.defragment()
        return []

    # -- heartbeats, defragmentation, failures ------------------------------------------------
    def heartbeat(self, force: bool = False) -> bool:
        """A round of heartbeats into the gManager, if one is due (or ``force``)."""
        now = self._clock()
        if not force and now - self.last_heartbeat_s < self.heartbeat_interval_s:
            return False
        self.last_heartbeat_s = now
        for hb in self.members.heartbeats():
            self.gmanager.on_heartbeat(hb)
            self.router.on_heartbeat(hb.instance_id)
        return True

    def heard_from(self, instance_ids: Iterable[int]) -> None:
        """Heartbeats went to the gManager by another way (Ray actors send their own): the
        router forgets what it promised those instances since."""
        for i in instance_ids:
            self.router.on_heartbeat(i)

    def defragment(self, with_repatriation: bool = True) -> list[Relocation]:
        """Run the gManager's plan now, between steps; the rBlocks moved (none when nothing
        is borrowed, the plan is empty, or the ledger was stale: the next heartbeats fix it)."""
        if not any(self.gmanager.edges().values()):
            return []  # nothing borrowed: no cycle to swap, nothing to bring home
        self.heartbeat(force=True)
        plan = self.gmanager.plan_defragmentation(with_repatriation=with_repatriation)
        if plan.is_empty:
            return []
        try:
            relocations = execute_plan(self.members.rmanagers(), plan, gmanager=self.gmanager)
        except ValueError as exc:
            logger.debug("defragmentation skipped: %s", exc)
            return []
        if not relocations:
            return []
        self.members.move_blocks(relocations)
        moved = self.members.relocate(relocations)
        assert moved == len(relocations), (
            f"moved {moved} block-table entries for {len(relocations)} rBlocks"
        )
        for r in relocations:
            self._record("migrate", r.old, r.new)
        self.num_migrated_blocks += moved
        self.num_defrag_runs += 1
        self.heartbeat(force=True)
        return relocations

    def fail_instance(self, instance_id: int) -> list[str]:
        """Lose an instance and its pool: the gManager forgets it, survivors recompute the
        requests that had rBlocks there, and its own requests are re-homed. Returns the
        affected request ids."""
        ids = self.members.ids()
        if instance_id not in ids:
            raise ValueError(f"no live instance {instance_id}")
        if len(ids) == 1:
            raise RuntimeError("cannot fail the last instance")
        orphans = self.members.remove(instance_id)
        self.gmanager.forget_instance(instance_id)
        self.num_failed_instances += 1
        self._record("fail", instance_id)
        affected = self.members.drop_instance(instance_id)
        self.heartbeat(force=True)
        for request in sorted(orphans, key=lambda r: r.arrival_time):
            home = self.route(request.num_tokens, request.request_id, self.prefix_hashes(request))
            self.members.adopt(home, request)
            affected.append(request.request_id)
        return affected

    def _record(self, kind: str, *entry: Any) -> None:
        if self.journal is not None:
            self.journal.append((kind, self.num_steps, *entry))
