"""The Ray transport: how an instance actor reaches its peers' pools and the gManager actor.

``RayTransport`` is the instance's ``MAExecutor`` and its borrowing transport. Per layer it
sends each creditor's share of the batch as one message on the data plane's channel to that
creditor (``cluster.channel``: queries, the new tokens' K,V and their slots; the MA's block
lists on a step's first layer only), all creditors at once, runs the local share while they
work, then collects each creditor's ``(out, lse)``; ``DistAttention`` merges them. A whole-step
native decode exchanges its layers from inside C instead (``remote_decode``: ``native_plane``
on one node, the Python hook ``cluster.remote_decode`` across nodes). Control messages (lend,
release, heartbeats, opening a channel) are Ray actor calls.
What the messages carry and how tensors are encoded for them: ``ray_messages``.

Failures: a lend to a dead (or already dropped) creditor answers a false ``LendReply`` and a
release to one is dropped (its memory died with it); both note the peer as unreachable. An MA
on a dead creditor cannot be answered: its channel reports the death (end of file, or a failed
liveness check after a silent poll slice; every wait is bounded), ``run`` raises
``PeerUnreachable`` and the instance abandons the step (nothing of it was committed) for the
driver to fail that instance.

The memory managers' proxies over actors (``RemoteGManager``, ``RemoteRManager``) are in
``ray_remote``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.dist import LocalExecutor, ShardWork
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan
from infinite_llm.cluster import native_plane
from infinite_llm.cluster.channel import ChannelSpec
from infinite_llm.cluster.channel_peers import ChannelClient, ChannelFailed
from infinite_llm.cluster.native_plane import NativeRemoteHook
from infinite_llm.cluster.ray_messages import ShardHeader, host
from infinite_llm.cluster.remote_decode import RemoteDecodeHook
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import LatencyRecorder

PEER_CALL_TIMEOUT_S = 30.0  # an actor call a step waits on (opening a channel, a ping)


@dataclass
class Exchange:
    """One layer's messages in flight (``RayTransport.send_shards`` -> ``collect``)."""

    start: float  # time.monotonic() when the sends began
    sent_at: dict[int, float] = field(default_factory=dict)  # creditor -> when its message went
    missing: list[int] = field(default_factory=list)  # creditors that could not be reached
    nbytes: int = 0  # payload sent


class PeerUnreachable(RuntimeError):
    """An MA could not be run because the instances holding its rBlocks are gone."""

    def __init__(self, instance_ids: list[int]) -> None:
        super().__init__(f"instances {instance_ids} are unreachable")
        self.instance_ids = instance_ids


class SampleRecorder(LatencyRecorder):
    """A ``LatencyRecorder`` whose raw samples can be shipped and merged across actors."""

    def values(self, last: int = 4096) -> list[float]:
        """The most recent ``last`` samples, oldest first."""
        with self._lock:
            n = len(self._samples)
            return list(itertools.islice(self._samples, max(0, n - last), None))


class RayTransport:
    """One instance's view of the cluster: its own pool directly, peers' pools through the data
    plane's channels (``ChannelClient``), their managers through actor calls.

    The step thread calls ``run``/``lend``/``release``; the driver swaps peers only between
    steps; counters take a lock.
    """

    def __init__(
        self, instance_id: int, pool: KVPool, attention_impl: str = "auto", node_id: str = ""
    ) -> None:
        self.instance_id = instance_id
        self.node_id = node_id
        self.block_size = pool.block_size
        self._local = LocalExecutor({instance_id: pool}, impl=attention_impl)
        self.impl = attention_impl
        self._peers: dict[int, Any] = {}  # instance_id -> actor handle
        self._lock = threading.Lock()
        self.unreachable: set[int] = set()  # peers a call failed on, reported with each step
        self.num_shard_calls = 0
        self.num_fused_remote_steps = 0  # steps whose remote shards joined a fused native decode
        self.num_native_remote_steps = 0  # ... of them, exchanged in C (``native_plane``)
        self.bytes_sent = 0  # payload out: queries, new K,V, slots
        self.bytes_received = 0  # payload back: (out, lse)
        self.layer_round_trip = SampleRecorder()  # issue -> every remote (out, lse) back
        self.layer_remote_wait = SampleRecorder()  # local share done -> every remote one back
        # per layer: what the channels cost (``run``), on one node's clock
        self.layer_wire = SampleRecorder()
        self._sent_batch: dict[int, MABatch | None] = {}  # creditor -> the batch it holds from us
        self.channels = ChannelClient(instance_id, self._open_channel, self.peer_alive)

    def set_peers(self, peers: Mapping[int, Any]) -> None:
        self._peers = {i: h for i, h in peers.items() if i != self.instance_id}

    def peer(self, instance_id: int) -> Any:
        return self._peers[instance_id]

    def forget_peer(self, instance_id: int) -> None:
        self._peers = {i: h for i, h in self._peers.items() if i != instance_id}  # one atomic swap
        self._sent_batch.pop(instance_id, None)
        self.channels.forget(instance_id)
        with self._lock:
            self.unreachable.discard(instance_id)

    def take_unreachable(self) -> list[int]:
        with self._lock:
            out, self.unreachable = sorted(self.unreachable), set()
        return out

    def _open_channel(self, creditor_id: int) -> ChannelSpec:
        spec: ChannelSpec = ray.get(
            self._peers[creditor_id].open_channel.remote(self.instance_id, self.node_id),
            timeout=PEER_CALL_TIMEOUT_S,
        )
        return spec

    def peer_alive(self, instance_id: int) -> bool:
        """Whether a peer that owes a reply still answers a ping (a slow answer counts as alive)."""
        peer = self._peers.get(instance_id)
        if peer is None:
            return False
        try:
            ray.get(peer.ping.remote(), timeout=PEER_CALL_TIMEOUT_S)
        except RayActorError:
            return False
        except GetTimeoutError:
            pass
        return True

    # -- MAExecutor ---------------------------------------------------------------------------
    def native_pools(self) -> Mapping[int, KVPool]:
        """This actor's own pool (``LocalExecutor.native_pools``); a peer's is not here."""
        return self._local.native_pools()

    def count_fused(self, plan: DistPlan, num_layers: int) -> None:
        pass  # remote shards of a whole step count themselves as they go (send_shards)

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every instance's share of one layer: each creditor's message out on its channel,
        the local share here meanwhile, then every reply."""
        exchange = self.send_shards(layer_idx, work)
        local = {i: w for i, w in work.items() if i == self.instance_id}
        results = self._local.run(layer_idx, local) if local else {}
        home = next(
            (t.device for w in work.values() for t in (w.q, w.k) if t is not None),
            torch.device("cpu"),
        )
        # Copied out of the channels' memory, which the next layer's replies reuse (onto the
        # GPU for a GPU instance).
        for inst, (out, lse) in self.collect(exchange).items():
            results[inst] = (out.to(home, copy=True), lse.to(home, copy=True))
        return results

    def forget_sent_batch(self, creditor_id: int) -> None:
        """The creditor no longer holds the batch this debtor sent last (the Python path's
        ``same`` flag must send the next one whole)."""
        self._sent_batch.pop(creditor_id, None)

    def remote_decode(
        self, plan: DistPlan, insts: tuple[int, ...], num_heads: int, head_dim: int
    ) -> RemoteDecodeHook | NativeRemoteHook:
        """The creditors' shards of a whole native decode step (``DistAttention.native_step``):
        exchanged in C (``native_plane``) where every creditor is on this node and takes it,
        else through the Python hook (``remote_decode``)."""
        pool = self._local.pools[self.instance_id]
        heads = (num_heads, pool.num_kv_heads, head_dim)
        with self._lock:
            self.num_fused_remote_steps += 1
        if native_plane.library() is not None and all(i in self._peers for i in insts):
            try:
                native = native_plane.set_up(self, plan, insts, heads, pool.num_layers)
            except (ChannelFailed, RayActorError, GetTimeoutError) as exc:
                failed = getattr(exc, "creditor_ids", list(insts))
                self.note_unreachable(failed)
                raise PeerUnreachable(sorted(failed)) from exc
            if native is not None:
                with self._lock:
                    self.num_native_remote_steps += 1
                return native
        return RemoteDecodeHook(self, plan, insts, *heads)

    def note_unreachable(self, instance_ids: list[int]) -> None:
        with self._lock:
            self.unreachable.update(instance_ids)

    def record_layers(
        self, round_trips: list[float], remote_waits: list[float], wires: list[float]
    ) -> None:
        """A step's layers' exchanges, in seconds (the native hook's, after its step)."""
        self.layer_round_trip.record_all(round_trips)
        self.layer_remote_wait.record_all(remote_waits)
        self.layer_wire.record_all(wires)

    def count_exchange(self, calls: int, sent: int, received: int) -> None:
        with self._lock:
            self.num_shard_calls += calls
            self.bytes_sent += sent
            self.bytes_received += received

    def send_shards(self, layer_idx: int, work: Mapping[int, ShardWork]) -> Exchange:
        """Send every creditor's share of a layer (``work`` of other instances; this one's own
        is skipped) on its channel; ``collect`` gets the replies."""
        exchange = Exchange(time.monotonic())
        for inst, w in work.items():
            if inst == self.instance_id:
                continue
            if inst not in self._peers:
                exchange.missing.append(inst)
                continue
            header, tensors = self._message(inst, layer_idx, w)
            exchange.sent_at[inst] = time.monotonic()
            try:
                self.channels.send(inst, header, tensors)
            except (ChannelFailed, RayActorError, GetTimeoutError):
                del exchange.sent_at[inst]
                self._sent_batch.pop(inst, None)
                exchange.missing.append(inst)
                continue
            exchange.nbytes += sum(t.nbytes for t in tensors if t is not None)
        return exchange

    def collect(self, exchange: Exchange) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every reply to ``exchange``, in the order the messages went out: ``(out, lse)`` views
        of the channels' memory, valid until the next message to that creditor; raises
        ``PeerUnreachable`` (the step is abandoned) when a creditor cannot answer.

        The wire time recorded per layer is what the channels cost, on the node's one
        monotonic clock: for the slowest creditor, from the send to the start of its work, plus
        from the end of its work (or of the local share, if that ended later) to its reply
        being read here; neither side's compute counts."""
        local_done = time.monotonic()
        sent_to = list(exchange.sent_at)
        missing = list(exchange.missing)
        try:
            replies = self.channels.wait(sent_to)
        except ChannelFailed as exc:
            missing += exc.creditor_ids
            replies = {}
        end = time.monotonic()
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        received = 0
        wire = 0.0
        on_one_clock = all(self.channels.kind(i) == "shm" for i in replies)
        for inst in sent_to:
            if inst not in replies:
                continue
            (began, ended, has_result), tensors = replies[inst]
            got = self.channels.arrivals[inst]
            wire = max(
                wire, began - exchange.sent_at[inst] + max(0.0, got - max(ended, local_done))
            )
            if has_result:
                out, lse = tensors
                assert out is not None and lse is not None
                results[inst] = (out, lse)
                received += out.nbytes + lse.nbytes
        with self._lock:
            self.num_shard_calls += len(sent_to)
            self.bytes_sent += exchange.nbytes
            self.bytes_received += received
            self.unreachable.update(missing)
        if sent_to and not missing:
            self.layer_round_trip.record(end - exchange.start)
            self.layer_remote_wait.record(end - local_done)
            if on_one_clock:
                self.layer_wire.record(wire)
        if missing:
            raise PeerUnreachable(sorted(set(missing)))
        return results

    def _message(
        self, creditor_id: int, layer_idx: int, work: ShardWork
    ) -> tuple[ShardHeader, list[torch.Tensor | None]]:
        # A step's plan hands every layer the same MABatch: its block lists cross once.
        batch = work.batch
        same = creditor_id in self._sent_batch and self._sent_batch[creditor_id] is batch
        spec = (
            None
            if same or batch is None
            else (batch.query_lens, batch.block_ids, batch.context_lens)
        )
        self._sent_batch[creditor_id] = batch
        tensors = [work.q, work.write_slots, work.k, work.v]
        return (layer_idx, spec, same), [None if t is None else host(t) for t in tensors]

    def probe_channel(self, peer_id: int, num_calls: int, payload_bytes: int) -> float:
        """Median seconds of a round trip on the channel to a peer with a ``payload_bytes``
        message each way and nothing done there (the data plane's own cost)."""
        payload = torch.zeros(max(1, payload_bytes // 4))
        times = []
        for i in range(num_calls + 1):
            begin = time.perf_counter()
            self.channels.send(peer_id, None, [payload])
            self.channels.wait([peer_id])
            if i:
                times.append(time.perf_counter() - begin)
        return float(np.median(times))

    # -- borrowing ----------------------------------------------------------------------------
    def lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        peer = self._peers.get(creditor_id)
        if peer is not None:
            try:
                reply: LendReply = ray.get(peer.lend.remote(request))
                return reply
            except RayActorError:
                with self._lock:
                    self.unreachable.add(creditor_id)
        return LendReply(
            creditor_id=creditor_id,
            debtor_id=request.debtor_id,
            request_id=request.request_id,
            granted=None,
        )

    def release(self, creditor_id: int, release: Release) -> None:
        peer = self._peers.get(creditor_id)
        if peer is None:
            return  # dropped: its memory is gone with it
        try:
            ray.get(peer.reclaim.remote(release))
        except RayActorError:
            with self._lock:
                self.unreachable.add(creditor_id)

    def peer_heartbeats(self) -> list[Heartbeat]:
        """A heartbeat from every reachable peer, now."""
        calls = {i: p.heartbeat.remote() for i, p in self._peers.items()}
        out = []
        for i, ref in calls.items():
            try:
                out.append(ray.get(ref))
            except RayActorError:
                with self._lock:
                    self.unreachable.add(i)
        return out

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "shard_calls": self.num_shard_calls,
                "fused_remote_steps": self.num_fused_remote_steps,
                "native_remote_steps": self.num_native_remote_steps,
                "shm_channels": sum(
                    self.channels.kind(c) == "shm" for c in self.channels.creditor_ids
                ),
                "zmq_channels": sum(
                    self.channels.kind(c) == "zmq" for c in self.channels.creditor_ids
                ),
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }
