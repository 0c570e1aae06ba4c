"""Turn step events into ``RequestOutput``s: token ids, text, logprobs, finish reasons, deltas.

The front end keeps its own record of each request (``TrackedRequest``), updated only from
``StepEvent``s, so it works the same whether the instances run in this process or on Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.engine.detokenizer import IncrementalDetokenizer
from infinite_llm.engine.events import StepEvent
from infinite_llm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from infinite_llm.sampling_params import SamplingParams


@dataclass
class TrackedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # vLLM's shape: None for the first prompt token, then {token: logprob} per prompt token.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None  # the prompt token's, per entry
    num_streamed_chars: int = 0
    num_streamed_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, TrackedRequest] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> TrackedRequest:
        want = params.logprobs is not None
        tracked = TrackedRequest(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
            logprobs=[] if want else None,
            cumulative_logprob=0.0 if want else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            prompt_logprob_ranks=[None] if params.prompt_logprobs is not None else None,
        )
        self.requests[request_id] = tracked
        return tracked

    def process(self, event: StepEvent) -> tuple[RequestOutput | None, bool]:
        """Apply an event. Returns (output to emit or None, whether a stop string just ended it)."""
        tracked = self.requests.get(event.request_id)
        if tracked is None:
            return None, False
        tracked.num_preemptions = event.num_preemptions
        if tracked.num_cached_tokens is None:
            tracked.num_cached_tokens = event.num_cached_tokens
        if event.prompt_logprobs and tracked.prompt_logprobs is not None:
            tracked.prompt_logprobs.extend(event.prompt_logprobs)
            if tracked.prompt_logprob_ranks is not None and event.prompt_logprob_ranks:
                tracked.prompt_logprob_ranks.extend(event.prompt_logprob_ranks)
        stopped = False
        if event.sampled is not None:
            sampled = event.sampled
            tracked.output_token_ids.append(sampled.token_id)
            if tracked.first_token_time is None:
                tracked.first_token_time = time.monotonic()
            if (
                tracked.logprobs is not None
                and sampled.top_logprobs is not None
                and sampled.logprob is not None
            ):
                tracked.logprobs.append(sampled.top_logprobs)
                assert tracked.cumulative_logprob is not None
                tracked.cumulative_logprob += sampled.logprob
            tracked.detokenizer.add_token(sampled.token_id)
            if tracked.detokenizer.stop_string is not None and event.finish_reason is None:
                stopped = True
        if stopped:
            self.finish(tracked, "stop", tracked.detokenizer.stop_string)
        elif event.finish_reason is not None:
            self.finish(tracked, event.finish_reason, event.stop_reason)
        elif event.sampled is None:
            return None, False  # a prefill chunk: nothing to show yet
        return self.make_output(tracked), stopped

    def finish(
        self, tracked: TrackedRequest, reason: str, stop_reason: int | str | None = None
    ) -> None:
        if tracked.finished:
            return
        if (
            tracked.detokenizer.stop_string is not None
        ):  # a stop string beats a same-step token stop
            reason, stop_reason = "stop", tracked.detokenizer.stop_string
        tracked.finish_reason = reason
        tracked.stop_reason = stop_reason
        tracked.finished_time = time.monotonic()

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        tracked = self.requests.get(request_id)
        if tracked is None:
            return None
        self.finish(tracked, reason)
        return self.make_output(tracked)

    def make_output(self, tracked: TrackedRequest) -> RequestOutput:
        """The request's output so far; ``delta_*`` hold what is new since the previous call."""
        detok = tracked.detokenizer
        finished = tracked.finished
        if finished:
            detok.flush(tracked.output_token_ids)
        text = detok.text[: detok.stable_length(finished)]
        delta_text = text[tracked.num_streamed_chars :]
        tracked.num_streamed_chars = max(tracked.num_streamed_chars, len(text))
        token_ids = list(tracked.output_token_ids)
        delta_tokens = token_ids[tracked.num_streamed_tokens :]
        tracked.num_streamed_tokens = len(token_ids)
        if finished:
            self.requests.pop(tracked.request_id, None)
        return RequestOutput(
            request_id=tracked.request_id,
            prompt=tracked.prompt,
            prompt_token_ids=tracked.prompt_token_ids,
            # Not copied per token: an output exists once the prompt is computed (or the request
            # ended), and the list never grows after that (preemption reports nothing again).
            prompt_logprobs=tracked.prompt_logprobs,
            prompt_logprob_ranks=tracked.prompt_logprob_ranks,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=tracked.cumulative_logprob,
                    logprobs=list(tracked.logprobs) if tracked.logprobs is not None else None,
                    finish_reason=tracked.finish_reason,
                    stop_reason=tracked.stop_reason,
                )
            ],
            finished=finished,
            metrics=RequestMetrics(
                arrival_time=tracked.arrival_time,
                first_token_time=tracked.first_token_time,
                finished_time=tracked.finished_time,
                num_preemptions=tracked.num_preemptions,
            ),
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            num_cached_tokens=tracked.num_cached_tokens,
        )
