"""The Ray transport: how an instance actor reaches its peers' pools and the gManager actor.

``RayTransport`` is the instance's ``MAExecutor`` and its borrowing transport. Per layer it
sends each creditor's share of the batch as one ``ShardMessage`` (queries, the new tokens' K,V
and their slots; the MA's block lists on a step's first layer only), all creditors at once,
runs the local share while they work, then collects each creditor's ``(out, lse)``;
``DistAttention`` merges them.
Tensors cross as numpy arrays (pickle protocol 5 moves their buffers without copying them
through pickle; a torch tensor pickles through ``torch.save``, 5-10x slower for these sizes).

Failures: a lend to a dead (or already dropped) creditor answers a false ``LendReply`` and a
release to one is dropped (its memory died with it); both note the peer as unreachable. An MA
on a dead creditor cannot be answered: ``run`` raises ``PeerUnreachable`` and the instance
abandons the step (nothing of it was committed) for the driver to fail that instance.

The memory managers' proxies over actors (``RemoteGManager``, ``RemoteRManager``,
``RemoteLedgerSink``) are in ``ray_remote``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.dist import LocalExecutor, ShardWork
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import LatencyRecorder

Packed = tuple[np.ndarray, str]  # (array, torch dtype name when numpy lacks it: "bfloat16")


def pack(t: torch.Tensor | None) -> Packed | None:
    """A tensor as a numpy array for the wire (only its own elements, never a larger base)."""
    if t is None:
        return None
    t = t.detach().contiguous()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), ""


def unpack(p: Packed | None) -> torch.Tensor | None:
    if p is None:
        return None
    array, kind = p
    if not array.flags.writeable:  # zero-copy from the object store: read-only
        array = array.copy()
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if kind == "bfloat16" else t


def packed_nbytes(*items: Packed | None) -> int:
    return sum(p[0].nbytes for p in items if p is not None)


BatchSpec = tuple[
    list[int], list[list[int]], list[int]
]  # MABatch: query_lens, block_ids, context_lens


@dataclass(frozen=True)
class ShardMessage:
    """One layer's ``ShardWork`` for one creditor, as it crosses: tensors, and the MA's block
    lists only on the step's first layer (``same_batch``: the creditor reuses the last ones
    this debtor sent; a debtor waits for each layer, so they always arrived first)."""

    debtor_id: int
    q: Packed | None  # [rows, Hq, D]
    write_slots: Packed | None  # [n] int64
    k: Packed | None  # [n, Hkv, D]
    v: Packed | None
    batch: BatchSpec | None = None
    same_batch: bool = False

    @property
    def nbytes(self) -> int:
        """Payload bytes: queries, new K,V and their slots (block lists not counted)."""
        return packed_nbytes(self.q, self.write_slots, self.k, self.v)


class ShardReceiver:
    """The creditor's side of ``ShardMessage``: rebuilds the ``ShardWork``, caching each
    debtor's ``MABatch`` for the rest of its step (its flat tables are built once, not per layer)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._batches: dict[int, MABatch | None] = {}  # debtor_id -> its current step's batch

    def work(self, message: ShardMessage) -> ShardWork:
        if message.same_batch:
            batch = self._batches[message.debtor_id]
        else:
            spec = message.batch
            batch = None if spec is None else MABatch(spec[0], spec[1], spec[2], self.block_size)
            self._batches[message.debtor_id] = batch
        return ShardWork(
            unpack(message.write_slots),
            unpack(message.k),
            unpack(message.v),
            unpack(message.q),
            batch,
        )

    def forget(self, debtor_id: int) -> None:
        self._batches.pop(debtor_id, None)


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
    """One instance's view of the cluster: its own pool directly, peers through actor calls.

    Thread-safe: the step thread calls ``run``/``lend``/``release`` while the driver may swap
    peers between steps; counters take a lock.
    """

    def __init__(self, instance_id: int, pool: KVPool, attention_impl: str = "auto") -> None:
        self.instance_id = instance_id
        self.block_size = pool.block_size
        self._local = LocalExecutor({instance_id: pool}, impl=attention_impl)
        self._peers: dict[int, Any] = {}  # instance_id -> actor handle
        self._lock = threading.Lock()
        self.unreachable: set[int] = set()  # peers a call failed on, reported with each step
        self.num_shard_calls = 0
        self.bytes_sent = 0  # payload out: queries, new K,V, slots
        self.bytes_received = 0  # payload back: (out, lse)
        self.layer_round_trip = SampleRecorder()  # issue -> every remote (out, lse) back
        self.layer_remote_wait = SampleRecorder()  # local share done -> every remote one back
        self._sent_batch: dict[int, MABatch | None] = {}  # creditor -> the batch it holds from us

    def set_peers(self, peers: Mapping[int, Any]) -> None:
        self._peers = {i: h for i, h in peers.items() if i != self.instance_id}

    def peer(self, instance_id: int) -> Any:
        return self._peers[instance_id]

    def forget_peer(self, instance_id: int) -> None:
        self._peers = {i: h for i, h in self._peers.items() if i != instance_id}  # one atomic swap
        self._sent_batch.pop(instance_id, None)
        with self._lock:
            self.unreachable.discard(instance_id)

    def take_unreachable(self) -> list[int]:
        with self._lock:
            out, self.unreachable = sorted(self.unreachable), set()
        return out

    # -- MAExecutor ---------------------------------------------------------------------------
    def local_pool(self, instance_id: int) -> KVPool | None:
        """This actor's own pool (``LocalExecutor.local_pool``); a peer's is not here."""
        return self._local.local_pool(instance_id) if instance_id == self.instance_id else None

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        calls: dict[int, Any] = {}
        missing: list[int] = []
        sent = 0
        for inst, w in work.items():
            if inst == self.instance_id:
                continue
            peer = self._peers.get(inst)
            if peer is None:
                missing.append(inst)
                continue
            message = self._message(inst, w)
            sent += message.nbytes
            calls[inst] = peer.run_shard.remote(layer_idx, message)
        local = {i: w for i, w in work.items() if i == self.instance_id}
        results = self._local.run(layer_idx, local) if local else {}
        local_done = time.perf_counter()
        received = 0
        for inst, ref in calls.items():
            try:
                reply = ray.get(ref)
            except RayActorError:
                missing.append(inst)
                continue
            if reply is not None:
                out, lse = unpack(reply[0]), unpack(reply[1])
                assert out is not None and lse is not None
                results[inst] = (out, lse)
                received += packed_nbytes(*reply)
        end = time.perf_counter()
        with self._lock:
            self.num_shard_calls += len(calls)
            self.bytes_sent += sent
            self.bytes_received += received
            self.unreachable.update(missing)
        if calls:
            self.layer_round_trip.record(end - start)
            self.layer_remote_wait.record(end - local_done)
        if missing:
            raise PeerUnreachable(sorted(missing))
        return results

    def _message(self, creditor_id: int, work: ShardWork) -> ShardMessage:
        # A step's plan hands every layer the same MABatch object: its block lists cross once.
        batch = work.batch
        same = creditor_id in self._sent_batch and self._sent_batch[creditor_id] is batch
        spec = (
            None
            if same or batch is None
            else (batch.query_lens, batch.block_ids, batch.context_lens)
        )
        self._sent_batch[creditor_id] = batch
        return ShardMessage(
            self.instance_id,
            pack(work.q),
            pack(work.write_slots),
            pack(work.k),
            pack(work.v),
            spec,
            same,
        )

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
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }
