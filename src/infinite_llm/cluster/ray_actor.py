"""``InstanceActor``: one instance in its own Ray worker process.

What an actor is built of, model or lender: ``ray_instance``. A *lender*
(``InstanceSpec.lender``: a memory instance, or a model instance's host pool; see
``PoolLayout``) is the same class built without a model: no weights, no tokenizer, no runner;
a pool, an RManager of its tier that lends every rBlock, the channel server that runs its
debtors' MAs, lends, reclaims and heartbeats. The driver never steps it and never homes a
request there.

``RayCluster`` wraps it with ``ray.remote(max_concurrency=...)``: a threaded actor, so while its
step thread runs the model (and waits on its creditors), other threads serve its peers:

    step thread        driver --step--> schedule, forward (per layer: a message to each
                       (Ray concurrency  creditor on the data plane's channel, its reply back),
                       group "step")    sample; borrowing: recommend -> gManager, lend -> peers;
                                        also the rBlock copies of defragmentation
    channel server     peers' per-layer messages --> MA over the rBlocks this pool lent them
    peer threads       peers  --open_channel/lend/reclaim--> this actor's channels and RManager
    heartbeat thread   every ``heartbeat_interval_s``: Heartbeat --> gManager (fire and forget)

Everything that computes with the instance's threads runs on the one step thread, which then
owns the process's one OpenMP team (``native.build``: a second team makes libgomp
park its workers between parallel regions); the model is loaded on the main thread, which gives
its team back, and the channel server computes its MAs with a single thread.

Thread safety: ``_lock`` serializes everything that touches this instance's own requests and
block tables (step, add/abort/finish, relocate, drop/adopt, snapshots); the driver never calls
those while a step runs, so it only guards against mistakes. Peer calls never take it: the
RManager has its own lock, and the pool slots a creditor writes for a debtor are blocks it
lent, disjoint from the blocks its own step reads and writes. A step waits on peers but neither
the channel server nor a peer call waits on anything, so mutual borrowing (A from B, B from A)
cannot deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from infinite_llm.cluster import native_plane
from infinite_llm.cluster.channel import ChannelSpec, channel_dir
from infinite_llm.cluster.channel_peers import ChannelServer
from infinite_llm.cluster.native_plane import NativeSetup
from infinite_llm.cluster.ray_instance import InstanceSpec, build_instance, load
from infinite_llm.cluster.ray_messages import Packed, ShardHeader, ShardReceiver, pack, unpack
from infinite_llm.cluster.ray_placement import NodeCores, node_threads
from infinite_llm.cluster.ray_remote import RemoteGManager
from infinite_llm.cluster.ray_snapshot import InstanceSnapshot
from infinite_llm.cluster.ray_transport import PeerUnreachable, RayTransport, SampleRecorder
from infinite_llm.engine.events import StepEvent
from infinite_llm.kvcache.borrow import RefreshOnEmpty
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.kvcache.prefix import prefix_counters
from infinite_llm.kvcache.tiers import Tier
from infinite_llm.native.build import use_openmp_threads_here
from infinite_llm.scheduler.order import OrderReport
from infinite_llm.scheduler.request import Request, RequestStatus

# The RManager calls a remote defragmentation executor may make (see ``RemoteRManager``).
RMANAGER_CALLS = frozenset(
    {
        "allocate",
        "lend",
        "new_lend_request",
        "record_borrowed",
        "reclaim",
        "repossess",
        "record_returned",
        "lent_refs",
        "borrowed_refs",
        "has_borrowed",
    }
)


@dataclass(frozen=True)
class StepReply:
    """One actor's step: its events, plus the peers (and gManager) it found unreachable."""

    events: list[StepEvent]
    unreachable: list[int]
    gmanager_unreachable: bool = False
    # the scheduler's cluster-order report (scheduler module: blocked, youngest, prefilling)
    order: OrderReport = (None, None, None)


class InstanceActor:
    """One instance as a threaded Ray actor: its own requests for the driver, its pool and
    RManager for its debtors (see the module docstring for the threads)."""

    def __init__(self, instance_id: int, spec: InstanceSpec) -> None:
        logging.getLogger("infinite_llm").setLevel(logging.WARNING)
        torch.set_num_threads(node_threads())  # to load; each step then takes its share
        self.node_id = ray.get_runtime_context().get_node_id()
        model, pool = load(spec)
        self.transport = RayTransport(instance_id, pool, spec.config.attention_impl, self.node_id)
        self.gmanager = RemoteGManager()
        # A failed borrow refreshes the gManager's view once a step, as in every runtime.
        self.views = RefreshOnEmpty(self.gmanager, self._refresh_view)
        self.borrow_stats = BorrowStats(latency=SampleRecorder())
        self.instance = build_instance(
            instance_id, spec, model, pool, self.transport, self.views, self.borrow_stats
        )
        self.instance_id = instance_id
        self.shard_serve = SampleRecorder()
        self.receiver = ShardReceiver(pool.block_size)
        self.serve_delay_s = 0.0  # fault injection: a creditor slow enough to die mid-step
        self.server = ChannelServer(
            instance_id,
            self._serve,
            channel_dir(spec.cluster_token),
            host=ray.util.get_node_ip_address(),
            # its MAs run beside this instance's own steps: one thread, no second OpenMP team
            on_start=lambda: use_openmp_threads_here(1),
        )
        self.cores = NodeCores(channel_dir(spec.cluster_token), instance_id)
        self.num_threads = 0  # of the last step
        self._lock = threading.Lock()
        self._heartbeat_interval_s = spec.heartbeat_interval_s
        self._heartbeats: threading.Thread | None = None

    def connect(self, peers: Mapping[int, Any], gmanager: Any) -> Heartbeat:
        """Learn the peers and the gManager, start heartbeats; returns a first heartbeat."""
        self.transport.set_peers(peers)
        self.gmanager.handle = gmanager
        if self._heartbeats is None:
            self._heartbeats = threading.Thread(
                target=self._heartbeat_loop, name="heartbeat", daemon=True
            )
            self._heartbeats.start()
        return self.instance.heartbeat()

    def set_gmanager(self, gmanager: Any) -> None:
        self.gmanager.handle = gmanager
        self.gmanager.unreachable = False

    def _refresh_view(self) -> None:
        """Every instance's heartbeat into the gManager now (its own and its peers')."""
        self.gmanager.push_heartbeats(
            [self.instance.heartbeat(), *self.transport.peer_heartbeats()]
        )

    def ping(self) -> int:
        return self.instance_id

    def _heartbeat_loop(self) -> None:
        while True:  # until the actor's process ends
            time.sleep(self._heartbeat_interval_s)
            try:
                self.gmanager.send_heartbeat(self.instance.heartbeat())
            except Exception:  # the gManager is restarting: the next beat goes to the new one
                logging.getLogger(__name__).debug("heartbeat not sent", exc_info=True)

    # -- own requests (driver) ----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        with self._lock:
            self.instance.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        with self._lock:
            return self.instance.abort_request(request_id)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        with self._lock:
            self.instance.finish_request(request_id, status)

    @ray.method(concurrency_group="step")
    def step(self, told: OrderReport = (None, None, None)) -> StepReply:
        """One step; a step that met a dead creditor is abandoned whole (retried next time).
        ``told``: what the other instances reported at their last step (``cluster_order``)."""
        with self._lock:
            scheduler = self.instance.scheduler
            scheduler.set_cluster_order(told)
            self.views.arm()
            threads = self.cores.begin()
            if threads != self.num_threads:  # on this thread: OpenMP keeps a count per thread
                torch.set_num_threads(threads)
                self.num_threads = threads
            try:
                events = self.instance.step()
            except PeerUnreachable:
                events = []
            finally:
                self.cores.end()
            order = scheduler.order_report
        gm_down, self.gmanager.unreachable = self.gmanager.unreachable, False
        return StepReply(events, self.transport.take_unreachable(), gm_down, order)

    # -- creditor side (peers) ----------------------------------------------------------------
    def lend(self, request: LendRequest) -> LendReply:
        return self.instance.lend(request)

    def reclaim(self, release: Release) -> None:
        self.instance.reclaim(release)

    def open_channel(self, debtor_id: int, debtor_node_id: str) -> ChannelSpec:
        """A debtor's channel to this actor (shared memory on one node, ZeroMQ across nodes)."""
        return self.server.open(debtor_id, same_node=debtor_node_id == self.node_id)

    def _serve(
        self,
        debtor_id: int,
        header: ShardHeader | NativeSetup | None,
        tensors: list[torch.Tensor | None],
    ) -> tuple[tuple[float, float, bool] | bool, list[torch.Tensor]]:
        """One message on a channel (the channel server's thread): a debtor's share of a layer,
        answered ``((started, finished, whether an MA ran), [out, lse])``; a ``NativeSetup``,
        answered whether C serves that step's layers (``native_plane``); the times by
        ``time.monotonic`` (one clock for every process of a node); None: a probe."""
        start = time.monotonic()
        if header is None:
            return (start, start, False), []
        if self.serve_delay_s:
            time.sleep(self.serve_delay_s)
        if isinstance(header, NativeSetup):  # a step whose layers C serves from here on
            end = self.server.end_in_service()
            served = None
            if end is not None:
                served = native_plane.accept(
                    header,
                    tensors[0],
                    end,
                    self.instance.pool,
                    self.transport.impl,
                    self.serve_delay_s,
                )
            if served is not None:
                previous = self.server.serve_natively(served)
                for seconds in [] if previous is None else previous.served_s():
                    self.shard_serve.record(seconds)
            return served is not None, []
        with torch.inference_mode():
            result = self.instance.run_shard(
                header[0], self.receiver.work(debtor_id, header, tensors)
            )
        end = time.monotonic()
        self.shard_serve.record(end - start)
        return (start, end, result is not None), ([] if result is None else list(result))

    def set_serve_delay(self, seconds: float) -> None:
        """Fault injection for tests: answer every channel message ``seconds`` late."""
        self.serve_delay_s = seconds

    def close(self) -> None:
        """Stop serving channels and remove their files (before the actor is killed)."""
        self.server.close()
        self.transport.channels.close()
        self.cores.close()

    def resident_bytes(self) -> int:
        """This process's resident memory now (Linux ``VmRSS``; 0 where unknown): the runtime,
        the rBlocks written so far and, in a model actor alone, the weights."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def noop(self, payload: Any = None) -> None:
        """For latency probes: the cost of one actor call, with or without a payload."""

    def probe_peer(self, peer_id: int, num_calls: int, payload_bytes: int) -> dict[str, float]:
        """Median seconds of a no-op call to a peer, bare and with a ``payload_bytes`` array, and
        of a round trip on the channel to it with that payload each way."""
        peer = self.transport.peer(peer_id)
        payload = np.zeros(max(1, payload_bytes // 4), dtype=np.float32)
        out: dict[str, float] = {}
        for name, args in (("noop_s", ()), ("payload_s", (payload,))):
            ray.get(peer.noop.remote(*args))
            times = []
            for _ in range(num_calls):
                start = time.perf_counter()
                ray.get(peer.noop.remote(*args))
                times.append(time.perf_counter() - start)
            out[name] = float(np.median(times))
        out["channel_s"] = self.transport.probe_channel(peer_id, num_calls, payload_bytes)
        return out

    # -- cluster housekeeping (driver, between steps) -----------------------------------------
    def heartbeat(self) -> Heartbeat:
        return self.instance.heartbeat()

    def rmanager_call(self, method: str, *args: Any) -> Any:
        """One RManager call of a defragmentation plan (the manager takes its own lock)."""
        if method not in RMANAGER_CALLS:
            raise ValueError(f"RManager.{method} is not callable remotely")
        return getattr(self.instance.rmanager, method)(*args)

    @ray.method(concurrency_group="step")  # compute: on the thread that owns the OpenMP team
    def read_blocks(self, block_ids: list[int]) -> tuple[Packed, Packed]:
        k, v = self.instance.read_blocks(block_ids)
        pk, pv = pack(k), pack(v)
        assert pk is not None and pv is not None
        return pk, pv

    @ray.method(concurrency_group="step")  # compute: on the thread that owns the OpenMP team
    def write_blocks(self, block_ids: list[int], k: Packed, v: Packed) -> None:
        tk, tv = unpack(k), unpack(v)
        assert tk is not None and tv is not None
        self.instance.write_blocks(block_ids, tk, tv)

    def relocate(self, relocations: list[Relocation]) -> int:
        with self._lock:
            return self.instance.relocate(relocations)

    def drop_instance(self, dead_id: int) -> list[str]:
        """A peer died: stop calling it, free what it borrowed, recompute what lived there."""
        self.transport.forget_peer(dead_id)
        self.receiver.forget(dead_id)
        with self._lock:
            return self.instance.drop_instance(dead_id)

    def adopt_request(self, request: Request) -> None:
        with self._lock:
            self.instance.adopt_request(request)

    def snapshot(self, check: bool = False) -> InstanceSnapshot:
        """Counts, block tables and counters; ``check`` first runs the RManager's own checks."""
        with self._lock:
            inst = self.instance
            rm, sched = inst.rmanager, inst.scheduler
            if check:
                rm.check_integrity()
                sched.check_prefix_cache()
            borrow = self.borrow_stats.as_dict()
            borrow.pop("latency", None)
            latency = self.borrow_stats.latency
            assert isinstance(latency, SampleRecorder)
            return InstanceSnapshot(
                instance_id=self.instance_id,
                node_id=self.node_id,
                kind=Tier(rm.tier).label if inst.is_memory else "model",
                tier=int(rm.tier),
                num_threads=self.num_threads,
                num_blocks=rm.num_blocks,
                num_free=rm.num_free_blocks,
                num_used=rm.num_used_blocks,
                num_lent=rm.num_lent_blocks,
                num_borrowed=rm.num_borrowed_blocks,
                num_cached=rm.num_cached_blocks,
                num_running=sched.num_running,
                num_waiting=sched.num_waiting,
                num_preemptions=sched.num_preemptions,
                block_owners=rm.block_owners(),
                cached_block_ids=rm.cached_block_ids(),
                lent_counts=rm.lent_counts(),
                block_tables={rid: req.block_table.refs() for rid, req in sched.requests.items()},
                ref_cnts=sched.allocator.shared.ref_cnts(),
                borrow=borrow,
                prefix_cache=prefix_counters(sched.allocator.prefix),
                borrow_latency_s=latency.values(),
                transport=self.transport.counters() | {"view_refreshes": self.views.num_refreshes},
                layer_round_trip_s=self.transport.layer_round_trip.values(),
                layer_remote_wait_s=self.transport.layer_remote_wait.values(),
                layer_wire_s=self.transport.layer_wire.values(),
                shard_serve_s=self.shard_serve.values(),
            )
