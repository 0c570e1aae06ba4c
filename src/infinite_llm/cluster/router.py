"""``Router``: picks each new request's home instance: the least pending work, then room; or,
where the instances share one device, the busiest one with room (``pack``). Both count a
cached prefix (``kvcache.prefix``) as work an instance will not do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROUTING_POLICIES = ("load", "pack")


class Router:
    """The instance with the least pending work (tokens still to prefill or generate over its
    unfinished requests); among equally loaded ones, one whose free rBlocks (as last heard in
    heartbeats, minus what was routed since) hold the request, then the most free rBlocks.
    Loosely coherent like the gManager.

    Why tokens, not requests: context lengths are heavy-tailed (a 100K-token document is as much
    work as a hundred chat turns), so balancing request counts leaves one instance with the long
    ones and the others idle at the end. In the simulator (``paper-32xA100``, long-tail trace,
    seeds 0-1) balancing counts made the no-borrow baseline's makespan up to 1.8x longer at 8
    instances; borrowing hid most of that, which the throughput ratio then credited to it. Free
    memory alone is no load signal while memory is plentiful.

    Why load before room: a request the least loaded instance cannot hold now waits there (or
    borrows) until that instance's requests free their rBlocks, and that instance drains first.
    Preferring any instance with room sent the long requests of a burst to the few instances
    with a pool-sized hole, one after another, where they ran in turn while the others idled
    at the end (``paper-32xA100`` long-tail trace, 32 instances, seeds 0-2: the no-borrow
    makespan 343 / 606 / 253 s, against 170 / 164 / 168 s by load alone; with borrowing 245 /
    219 / 218 s against 177 / 162 / 158 s).

    ``policy="pack"``, for instances that share one device and step in turn
    (``InProcessCluster``, the simulator's serial execution): the busiest instance (most
    pending tokens) with a place in its batch and room for the request, else as ``load``.
    There an instance step has a fixed cost whatever its batch (19-21 ms in ``bench paper``'s fits:
    SmolLM2 on one thread), so two instances running half a batch each pay it twice where one
    running the whole batch pays it once, and nothing runs in parallel to make up for it. With
    borrowing, room counts what the other instances can lend: pooled memory lets one instance
    batch what would otherwise spread over several, the paper's case for borrowing (batches
    grow where memory, not compute, limited them). On separate devices (Ray) spreading is what
    keeps them all busy, and ``load`` stays. Simulator, ``bench paper``'s fitted costs and
    traces (chat, docs, long tail), seeds 0-7: the no-borrow baseline's tokens/s against
    ``load`` routing +13 / +28 / +31 % on chat (2 / 4 / 8 instances), -2 to -1 % on docs,
    +6 / +12 / +10 % on the long tail; borrowing's ratio to it 1.00-1.16 / 1.00-1.38 /
    1.06-1.30, against 0.93-1.07 / 0.95-1.11 / 0.97-1.14 with ``load``.

    The prefix cache: ``cached`` says, per instance, how many of the request's leading full
    rBlocks it serves (held by its requests or cached in its pool: the gManager's prefix index,
    loosely coherent). Those tokens are prefill the instance will not do, so ``load`` subtracts
    them from its pending work: a request goes where its prefix is unless that instance is
    busier by more than the prefix is long (SGLang's router weighs its prefix tree against
    load likewise, with a threshold instead of one unit). ``pack`` prefers the instance with
    the longest prefix among those with room, then the busiest. A miss costs the whole
    prefill (SmolLM2 on this CPU: 2,000 tokens take about 3 s); a hit on another instance
    costs only what attending it in place adds to each step."""

    def __init__(self, block_size: int, policy: str = "load") -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
        self.block_size = block_size
        self.policy = policy
        self._routed_blocks: dict[
            int, int
        ] = {}  # blocks promised since the instance's last heartbeat

    def on_heartbeat(self, instance_id: int) -> None:
        self._routed_blocks.pop(instance_id, None)

    def pick(
        self,
        instance_ids: Sequence[int],
        free_blocks: dict[int, int],
        pending_tokens: dict[int, int],
        num_tokens: int,
        room: Mapping[int, int] | None = None,
        pooled: bool = False,
        cached: Mapping[int, int] | None = None,
    ) -> int:
        """``pending_tokens``: per instance, tokens still to prefill or generate there
        (``Scheduler.num_pending_tokens``); ``num_tokens``: the new request's context.
        ``pack`` only: ``room``, per instance, the rBlocks a request queued there now could get
        (``pack_room``; an instance missing from it has no place in its batch); ``pooled``: the
        instances borrow, so a request routed anywhere takes from every instance's room.
        ``cached``: per instance, the request's leading full rBlocks it serves."""
        if not instance_ids:
            raise RuntimeError("no live instance to route to")

        need = -(-num_tokens // self.block_size)
        cached = cached or {}
        if self.policy == "pack" and room is not None:
            promised = sum(self._routed_blocks.values())

            def left(i: int) -> int:
                return room[i] - (promised if pooled else self._routed_blocks.get(i, 0))

            fits = [i for i in instance_ids if i in room and left(i) >= need]
            if fits:
                home = max(fits, key=lambda i: (cached.get(i, 0), pending_tokens.get(i, 0), -i))
                self._routed_blocks[home] = self._routed_blocks.get(home, 0) + need
                return home

        def score(i: int) -> tuple[int, bool, int, int]:
            free = free_blocks.get(i, 0) - self._routed_blocks.get(i, 0)
            work = pending_tokens.get(i, 0) - cached.get(i, 0) * self.block_size
            return (-work, free >= need, free, -i)

        home = max(instance_ids, key=score)
        self._routed_blocks[home] = self._routed_blocks.get(home, 0) + need
        return home

    def route(
        self,
        loads: Mapping[int, InstanceLoad],
        free_blocks: dict[int, int],
        lendable: Mapping[int, int],
        num_tokens: int,
        pooled: bool,
        cached: Mapping[int, int] | None = None,
    ) -> int:
        """``pick`` from every live instance's load (``loads``), the free rBlocks of the last
        heartbeats and, for ``pack``, what the others can lend (``lendable``, with ``pooled``);
        ``cached``: the prefix each serves (``pick``)."""
        pending = {i: load.pending_tokens for i, load in loads.items()}
        room = pack_room(loads, free_blocks, lendable, pooled) if self.policy == "pack" else None
        return self.pick(sorted(loads), free_blocks, pending, num_tokens, room, pooled, cached)


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """What the router reads of an instance: tokens still to prefill or generate over its
    unfinished requests (``Scheduler.num_pending_tokens``), how many requests are unfinished
    there, and how many its batch may hold (``max_num_seqs``)."""

    pending_tokens: int
    num_unfinished: int
    max_num_seqs: int

    @classmethod
    def of(cls, scheduler: Any) -> InstanceLoad:
        """A local scheduler's load, exactly."""
        return cls(
            scheduler.num_pending_tokens,
            scheduler.num_waiting + scheduler.num_running,
            scheduler.config.max_num_seqs,
        )


def pack_room(
    loads: Mapping[int, InstanceLoad],
    free_blocks: Mapping[int, int],
    lendable: Mapping[int, int],
    pooled: bool,
) -> dict[int, int]:
    """``Router.pick``'s ``room`` for ``pack``: per instance with a place left in its batch
    (fewer unfinished requests than ``max_num_seqs``), its free rBlocks as last heard, and with
    ``pooled`` what the others can lend (``lendable``, the gManager's view). Requests queued
    there are not subtracted: they wait for memory in the busiest instance's queue rather
    than open a second batch (simulator, as above: subtracting them sent requests elsewhere
    as soon as a queue formed; borrowing's ratio fell below 1 on 2 of 48 runs)."""
    lend_all = sum(lendable.values())
    room = {}
    for i, load in loads.items():
        if load.num_unfinished < load.max_num_seqs:
            free = free_blocks.get(i, 0)
            room[i] = free + lend_all - lendable.get(i, 0) if pooled else free
    return room
