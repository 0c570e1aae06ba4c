"""The cluster contract the front end (``LLMEngine``, the server) drives, and shared helpers.

Two implementations: ``InProcessCluster`` (every instance in this process, the default) and
``RayCluster`` (one Ray actor per instance plus one for the gManager).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.cluster.core import ClusterCore
from infinite_llm.config import EngineConfig
from infinite_llm.engine.events import StepEvent
from infinite_llm.model.config import ModelArchConfig
from infinite_llm.model.loader import parse_dtype
from infinite_llm.scheduler.request import Request, RequestStatus

if TYPE_CHECKING:
    from infinite_llm.cluster.layout import PoolLayout

logger = logging.getLogger(__name__)

DEFAULT_KV_MEMORY = 2 << 30  # per instance, when neither blocks nor bytes are given
DEFAULT_KV_FRACTION = 0.25  # ... and at most this share of the memory available now


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def block_bytes(config: EngineConfig, arch: ModelArchConfig) -> int:
    """Bytes of one rBlock (K and V of ``block_size`` tokens, every layer) in ``config``."""
    return KVPool.bytes_per_block(
        arch.num_layers,
        arch.num_kv_heads,
        arch.head_dim,
        config.cache.block_size,
        parse_dtype(config.dtype),
    )


def resolve_num_blocks(config: EngineConfig, arch: ModelArchConfig) -> int:
    """rBlocks per instance: given, or as many as the KV memory (given or defaulted) holds."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = block_bytes(config, arch)
    memory = cache.memory_bytes
    if memory is None:
        memory = min(
            DEFAULT_KV_MEMORY, int(available_memory() * DEFAULT_KV_FRACTION) // config.num_instances
        )
    num_blocks = memory // per_block
    if num_blocks < 1:
        raise ValueError(f"KV memory of {memory} bytes holds no rBlock ({per_block} bytes each)")
    return num_blocks


def resolve_memory_blocks(
    config: EngineConfig, arch: ModelArchConfig, model_blocks: int, memory: int | None
) -> int:
    """rBlocks of a pool of ``memory`` bytes (a memory instance's, a host pool's), or as many
    as a model instance's pool (``model_blocks``) when None."""
    if memory is None:
        return model_blocks
    per_block = block_bytes(config, arch)
    if memory < per_block:
        raise ValueError(f"KV memory of {memory} bytes holds no rBlock ({per_block} bytes each)")
    return memory // per_block


def check_pools_fit(config: EngineConfig, arch: ModelArchConfig, pools: dict[str, int]) -> None:
    """Refuse, before allocating any, KV pools that this machine's available memory cannot
    hold (``pools``: what each kind of instance needs in all, in rBlocks)."""
    per_block = block_bytes(config, arch)
    total = sum(pools.values()) * per_block
    available = available_memory()
    if total > available:
        parts = ", ".join(f"{what} {n * per_block / 2**30:.2f} GiB" for what, n in pools.items())
        raise ValueError(
            f"the KV pools need {total / 2**30:.2f} GiB ({parts}) but this machine has "
            f"{available / 2**30:.2f} GiB available: give smaller --kv-memory / "
            "--memory-instance-kv-memory, or fewer instances"
        )


def max_request_blocks(
    num_blocks: int,
    num_instances: int,
    lending_cap: float,
    borrowing: bool,
) -> int:
    """The most rBlocks one request can ever hold: its home pool plus what the other model
    instances may lend (``PoolLayout`` adds the pools without a model)."""
    if not borrowing:
        return num_blocks
    return num_blocks + (num_instances - 1) * int(lending_cap * num_blocks)


class Cluster(abc.ABC):
    """Instances, their router and gManager; requests go in, ``StepEvent``s come out. Every
    policy across instances is the cluster core's (``ClusterCore``), which each runtime runs
    over its own ``Members``."""

    block_size: int
    num_blocks_per_instance: int
    core: ClusterCore
    layout: PoolLayout
    ended_by_failure: list[StepEvent]  # ``fail_instance``'s, for the next step to return

    @property
    def max_request_tokens(self) -> int:
        """Tokens one request could hold if it had the whole cluster's lendable memory (the
        live instances': it shrinks when one fails)."""
        return self.layout.max_request_blocks_of(self.live_instance_ids()) * self.block_size

    @abc.abstractmethod
    def live_instance_ids(self) -> list[int]:
        """Every live instance, model or not."""

    @abc.abstractmethod
    def add_request(self, request: Request, home: int | None = None) -> int:
        """Queue on ``home``, or on the instance the router picks; returns the home's id."""

    @abc.abstractmethod
    def abort_request(self, request_id: str) -> None:
        """Drop the request wherever it is and free its rBlocks on every instance."""

    @abc.abstractmethod
    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request the front end decided is done (a stop string matched)."""

    @abc.abstractmethod
    def step(self) -> list[StepEvent]:
        """One iteration on every instance (heartbeats and defragmentation in between)."""

    def step_in_parts(self) -> Iterator[list[StepEvent]]:
        """``step()`` as the events come: a cluster whose instances step one after another
        yields each instance's as soon as it stepped, so that its tokens go out before the next
        instance's step (run the iterator to its end: the step's housekeeping closes it)."""
        yield self.step()

    @abc.abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Per instance free/used/lent/borrowed rBlocks (and the free ones cached: how many,
        which), the prefix cache's counters; ledger edges, locality, counters."""

    @abc.abstractmethod
    def check_integrity(self) -> None:
        """Raise AssertionError unless every manager and every block table agree."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release processes and memory (Ray actors); in-process needs nothing."""

    # -- the core's housekeeping, callable between steps ----------------------------------------
    @property
    def defrag_interval_steps(self) -> int:
        return self.core.defrag_interval_steps

    @defrag_interval_steps.setter
    def defrag_interval_steps(self, steps: int) -> None:
        self.core.defrag_interval_steps = steps

    def send_heartbeats(self, force: bool = True) -> None:
        """A round of heartbeats now (``force``) or if one is due: the gManager's view then
        equals every rManager."""
        self.core.heartbeat(force)

    def defragment(self, with_repatriation: bool = True) -> int:
        """Run the gManager's plan now (between steps): returns how many rBlocks moved."""
        return len(self.core.defragment(with_repatriation))

    def fail_instance(self, instance_id: int) -> list[str]:
        """Lose an instance and its pool (a Ray actor is killed if still alive). Requests with
        rBlocks there restart from their tokens on the survivors; requests homed there are
        re-homed; a request the survivors can no longer hold whole (prompt and every token it
        may generate) ends with an error at the next step instead of waiting for memory that
        will not come back. Returns the affected request ids."""
        affected = self.core.fail_instance(instance_id)
        limit = self.max_request_tokens
        for request_id, need in self.request_needs().items():
            if need > limit:
                logger.warning(
                    "request %s needs %d tokens of KV but the cluster holds at most %d since "
                    "instance %d failed: it ends with an error",
                    request_id,
                    need,
                    limit,
                    instance_id,
                )
                self.finish_request(request_id, RequestStatus.FINISHED_ERROR)
                self.ended_by_failure.append(StepEvent(request_id, None, "error"))
        return affected

    @abc.abstractmethod
    def request_needs(self) -> dict[str, int]:
        """Per unfinished request, the tokens of KV it may come to hold (its prompt and every
        token it may generate)."""

    def take_failure_events(self) -> list[StepEvent]:
        """The events of requests ``fail_instance`` ended, once (a step returns them)."""
        events, self.ended_by_failure = self.ended_by_failure, []
        return events
