"""Continuous batching at iteration level: chunked prefill under a token budget, FCFS, preemption.

Each step: running requests first (decodes and unfinished prefill chunks, in admission order),
then waiting requests in arrival order while the token budget and rBlocks last. When a running
request cannot get an rBlock, the most recently admitted request is preempted: its rBlocks are
freed and it is recomputed from its tokens (prompt + output so far) when memory returns, which
yields exactly the same continuation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.scheduler.output import ScheduledRequest, SchedulerOutput
from infinite_llm.scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 128  # running requests at most

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")


class BlockAllocator(Protocol):
    """Where a request's rBlocks come from: the local RManager, or one that also borrows."""

    def allocate(self, num_blocks: int) -> list[BlockRef] | None:
        """All ``num_blocks`` or None."""
        ...

    def free(self, refs: Iterable[BlockRef]) -> None: ...


@dataclass(frozen=True, slots=True)
class StepResult:
    request: Request
    new_token_id: int | None  # None when the step only advanced a prefill chunk
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, allocator: BlockAllocator) -> None:
        self.config = config
        self.block_size = block_size
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request as aborted and free its rBlocks; None when unknown or finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = time.monotonic()
        self._free_blocks(request)
        self.requests.pop(request.request_id, None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._ensure_blocks(request, request.num_computed_tokens + num_new):
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new

        # New work only when nothing was preempted: memory is short.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._ensure_blocks(request, request.num_computed_tokens + num_new):
                break  # FCFS: later requests wait behind the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[StepResult]:
        """Advance every scheduled request; append sampled tokens; finish on token-level stops."""
        results: list[StepResult] = []
        for item in out.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:  # aborted while the step ran
                continue
            samples = item.samples
            request.num_computed_tokens += item.num_new_tokens
            if not samples:
                results.append(StepResult(request, None, False))
                continue
            token_id = sampled[request.request_id]
            request.output_token_ids.append(token_id)
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            status = request.check_stop(token_id)
            if status is not None:
                self.finish_request(request, status)
            results.append(StepResult(request, token_id, status is not None))
        return results

    # -- memory -----------------------------------------------------------------------------
    def _ensure_blocks(self, request: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(request.block_table)
        if need <= 0:
            return True
        refs = self.allocator.allocate(need)
        if refs is None:
            return False
        request.block_table.append(refs)
        return True

    def _free_blocks(self, request: Request) -> None:
        refs = request.block_table.clear()
        if refs:
            self.allocator.free(refs)

    def preempt(self, request: Request) -> None:
        """Free a running request's rBlocks and queue it first, to be recomputed from its tokens."""
        self.running.remove(request)
        self._free_blocks(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
