"""A request's state as the scheduler sees it: tokens, progress, rBlocks, status."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.kvcache.block import BlockTable
from infinite_llm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_arrival_seq = itertools.count()


@dataclass(eq=False)
class Request:
    """``num_computed_tokens`` of ``all_token_ids`` have K,V in the request's rBlocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: min(sampling_params.max_tokens, max_model_len - prompt length)
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Creation order in this process (the driver's, for a cluster): lower is older. A request
    # waiting for memory has the right of way over younger ones on every instance.
    arrival_seq: int = field(default_factory=lambda: next(_arrival_seq))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt positions whose logprobs were reported (``sampling_params.prompt_logprobs``).
    num_prompt_logprobs: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_table: BlockTable = field(default_factory=BlockTable)
    home_instance_id: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # One sample of a parallel-sampling request (``n`` > 1): the parent's id, the same for
    # every sample. The home scheduler lets the samples share the prompt's full rBlocks.
    parent_id: str | None = None
    # The prefix cache's (``kvcache.prefix``): the chained hashes of the full rBlocks of prompt +
    # output computed so far, how many of the block table's leading rBlocks are named in the
    # cache, and how many prompt tokens the first admission found cached (None: not admitted).
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_cached_tokens: int | None = None
    # Opaque to the scheduler: the sampler's per-request random generator (kept across preemption,
    # so a resumed request draws the same numbers it would have drawn).
    generator: Any = None
    # Opaque to the scheduler too: the sampler's grammar matcher of a constrained request
    # (engine/structured.py); it mirrors output_token_ids, so it survives preemption as they do.
    structured: Any = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Work left, in tokens: those still to prefill (all of them again after a preemption)
        plus the output tokens still to generate (``max_tokens`` bounds them; with ``ignore_eos``
        it is exact); 0 once finished. The router's load signal."""
        if self.status.finished:
            return 0
        return max(0, self.num_tokens - self.num_computed_tokens) + max(
            0, self.max_tokens - self.num_output_tokens
        )

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def check_stop(self, token_id: int) -> RequestStatus | None:
        """After appending ``token_id``: the finished status it causes, if any (token-level stops)."""
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens:
            if token_id in (params.stop_token_ids or ()):
                self.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id == self.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
