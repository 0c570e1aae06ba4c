"""``InProcessCluster``: every instance in this process, sharing the model weights read-only.

N instances cost N KV pools and one copy of the weights. Each instance has its own pool,
RManager and scheduler; when a home instance runs out of rBlocks its allocator borrows from
creditors recommended by the gManager. Between steps the cluster sends heartbeats, runs the
gManager's defragmentation plans (copying rBlocks and switching block tables while no step
runs), and can lose an instance (``fail_instance``) without losing a request.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.cluster.base import Cluster, max_request_blocks, resolve_num_blocks
from infinite_llm.cluster.router import Router
from infinite_llm.cluster.transport import InProcessTransport
from infinite_llm.config import EngineConfig
from infinite_llm.engine.events import StepEvent
from infinite_llm.engine.instance import Instance
from infinite_llm.engine.model_runner import ModelRunner
from infinite_llm.kvcache.borrow import Borrower, RefreshOnEmpty
from infinite_llm.kvcache.gmanager import GManager
from infinite_llm.kvcache.integrity import check_cluster, pool_counts, pool_state
from infinite_llm.kvcache.metrics import BorrowStats, locality
from infinite_llm.kvcache.migration import execute_plan
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.model.loader import LoadedModel, parse_dtype
from infinite_llm.scheduler.order import grant_right_of_way
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


class InProcessCluster(Cluster):
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        cache = config.cache
        self.block_size = cache.block_size
        self.num_blocks_per_instance = resolve_num_blocks(config, loaded.arch)
        self.borrowing = cache.enable_borrowing and config.num_instances > 1
        lending_cap = cache.lending_cap if self.borrowing else 0.0
        self.gmanager = GManager()
        # the instances step in turn on one device: pack requests into fewer, bigger batches
        self.router = Router(self.block_size, policy="pack")
        self.transport = InProcessTransport(config.attention_impl)
        self.borrow_stats = BorrowStats()
        arch, dtype, device = loaded.arch, parse_dtype(config.dtype), torch.device(config.device)
        self.instances: dict[int, Instance] = {}
        # A failed borrow refreshes the gManager's view once a step (direct heartbeats, cheap here).
        self._views = RefreshOnEmpty(self.gmanager, lambda: self.send_heartbeats(force=True))
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
            allocator = (
                Borrower(
                    rmanager,
                    self._views,
                    self.transport.lend,
                    self.transport.release,
                    stats=self.borrow_stats,
                )
                if self.borrowing
                else rmanager
            )
            scheduler = Scheduler(config.scheduler, self.block_size, allocator)
            runner = ModelRunner(
                loaded.model, self.block_size, self.transport, seed=config.seed + i
            )
            instance = Instance(i, runner, pool, rmanager, scheduler, config.attention_impl)
            self.instances[i] = instance
            self.transport.attach(instance)
        self._max_blocks = max_request_blocks(
            self.num_blocks_per_instance, config.num_instances, lending_cap, self.borrowing
        )
        self._home: dict[str, int] = {}
        self._last_heartbeat = float("-inf")
        self._num_steps = 0
        self.num_migrated_blocks = 0
        self.num_defrag_runs = 0
        self.num_failed_instances = 0
        self.heartbeat_interval_s = 0.02
        self.defrag_interval_steps = 8
        self.send_heartbeats(force=True)

    # -- contract ---------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        return self._max_blocks * self.block_size

    def add_request(self, request: Request, home: int | None = None) -> int:
        if home is None:
            home = self._route(request)
        elif home not in self.instances:
            raise ValueError(f"no live instance {home}")
        self.instances[home].add_request(request)
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
        self.send_heartbeats()
        events: list[StepEvent] = []
        for inst in list(self.instances.values()):
            if self.borrowing:
                grant_right_of_way({i: x.scheduler for i, x in self.instances.items()})
                self._views.arm()
            events.extend(inst.step())
        for event in events:
            if event.finish_reason is not None:
                self._home.pop(event.request_id, None)
        self._num_steps += 1
        if self.borrowing and self._num_steps % self.defrag_interval_steps == 0:
            self.defragment()
        return events

    def _route(self, request: Request) -> int:
        schedulers = {i: inst.scheduler for i, inst in self.instances.items()}
        return self.router.route(schedulers, self.gmanager, request.num_tokens, self.borrowing)

    # -- heartbeats, defragmentation, failures ----------------------------------------------
    def send_heartbeats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_interval_s:
            return
        self._last_heartbeat = now
        for i, inst in self.instances.items():
            self.gmanager.on_heartbeat(inst.heartbeat())
            self.router.on_heartbeat(i)

    def defragment(self, with_repatriation: bool = True) -> int:
        """Run the gManager's plan now (between steps): returns how many rBlocks moved."""
        if not any(self.gmanager.edges().values()):
            return 0  # nothing borrowed: no cycle to swap, nothing to bring home
        self.send_heartbeats(force=True)
        plan = self.gmanager.plan_defragmentation(with_repatriation=with_repatriation)
        if plan.is_empty:
            return 0
        managers = {i: inst.rmanager for i, inst in self.instances.items()}
        try:
            relocations = execute_plan(managers, plan, gmanager=self.gmanager)
        except ValueError as exc:  # the ledger was stale: try again after the next heartbeats
            logger.debug("defragmentation skipped: %s", exc)
            return 0
        if not relocations:
            return 0
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
        moved = sum(inst.relocate(relocations) for inst in self.instances.values())
        assert moved == len(relocations), (
            f"moved {moved} block-table entries for {len(relocations)} rBlocks"
        )
        self.num_migrated_blocks += moved
        self.num_defrag_runs += 1
        self.send_heartbeats(force=True)
        return moved

    def fail_instance(self, instance_id: int) -> list[str]:
        """Lose an instance and its pool. Requests with rBlocks there restart from their tokens
        on the survivors; requests homed there are re-homed. Returns the affected request ids."""
        dead = self.instances.pop(instance_id)
        if not self.instances:
            self.instances[instance_id] = dead
            raise RuntimeError("cannot fail the last instance")
        self.transport.detach(instance_id)
        self.gmanager.forget_instance(instance_id)
        self.num_failed_instances += 1
        affected: list[str] = []
        for inst in self.instances.values():
            affected += inst.drop_instance(instance_id)
        orphans = list(dead.scheduler.requests.values())
        for request in orphans:
            request.block_table.clear()  # its rBlocks were on the dead pool or lent to it
        self.send_heartbeats(force=True)
        for request in sorted(orphans, key=lambda r: r.arrival_time):
            home = self._route(request)
            self.instances[home].adopt_request(request)
            self._home[request.request_id] = home
            affected.append(request.request_id)
        return affected

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        tables = {
            rid: (req.home_instance_id, req.block_table)
            for inst in self.instances.values()
            for rid, req in inst.scheduler.requests.items()
        }
        loc = locality(tables)
        borrow = self.borrow_stats
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
                }
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
            "migrated_blocks": self.num_migrated_blocks,
            "defrag_runs": self.num_defrag_runs,
            "remote_ma_calls": self.transport.num_shard_calls,
            "failed_instances": self.num_failed_instances,
        }

    def check_integrity(self) -> None:
        self.send_heartbeats(force=True)  # the ledger must equal reality after a heartbeat round
        for inst in self.instances.values():
            inst.rmanager.check_integrity()
        self.gmanager.check_integrity()
        check_cluster(
            [
                pool_state(
                    inst.rmanager,
                    ((rid, r.block_table) for rid, r in inst.scheduler.requests.items()),
                )
                for inst in self.instances.values()
            ],
            self.gmanager.edges(),
        )
