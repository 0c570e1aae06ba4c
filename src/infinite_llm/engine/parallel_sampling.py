"""Parallel sampling in the front end: a request of ``n`` samples (``best_of`` generated) fans
out into one child request per sample, and their outputs are gathered back into one
``RequestOutput`` (vLLM v1's ``ParentRequest``).

Each child is an ordinary one-sample request with its own id (``f"{i}_{parent_id}"``, as
vLLM names them), its own seed stream (``seed + i``; without a seed each draws its own), its
own stops and detokenizer. The children carry the parent's id (``Request.parent_id``) and go
to one home instance, whose scheduler lets them share the prompt's rBlocks.

What the parent emits, per child output:

* ``best_of`` == ``n``: the child's progress as an output of the parent (``request_id`` the
  parent's) holding that one sample (``outputs[0].index`` its index, the deltas its own,
  ``finished`` False); after the last sample finished, one more with every sample in index
  order and ``finished`` True (nothing new in it: no delta).
* ``best_of`` > ``n``: only that final output, holding the ``n`` samples of the highest
  cumulative logprob, best first, renumbered ``0..n-1`` (the logprobs were computed for the
  ranking; they are returned only if asked for).
"""

from __future__ import annotations

from dataclasses import replace

from infinite_llm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request


def child_id(parent_id: str, index: int) -> str:
    return f"{index}_{parent_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample ``index``'s own parameters: one sample, seed ``seed + index``, the sampled
    tokens' logprobs when ``best_of`` ranks the samples by them, and the prompt's logprobs
    for sample 0 alone (it computes the whole prompt; the others share its rBlocks)."""
    seed = None if params.seed is None else params.seed + index
    logprobs = params.logprobs
    if logprobs is None and params.num_samples > params.n:
        logprobs = 0
    prompt_logprobs = params.prompt_logprobs if index == 0 else None
    return replace(
        params, n=1, best_of=None, seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs
    )


class ParentRequest:
    """One request of several samples, as the front end tracks it."""

    def __init__(self, request: Request) -> None:
        params = request.sampling_params
        self.request_id = request.request_id
        self.params = params
        self.children = [
            Request(
                request_id=child_id(request.request_id, i),
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=child_params(params, i),
                max_tokens=request.max_tokens,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                parent_id=request.request_id,
            )
            for i in range(params.num_samples)
        ]
        self.index = {child.request_id: i for i, child in enumerate(self.children)}
        self._latest: dict[int, RequestOutput] = {}  # per sample index
        self._unfinished = set(self.index)
        # Sample 0's: it prefills the prompt before the others start, so its first output has
        # them all; every sample's output carries them (an echo of the prompt shows them).
        self._prompt_logprobs: list[dict[int, float] | None] | None = None
        self._prompt_logprob_ranks: list[int | None] | None = None
        # Sample 0's too: the prompt tokens it found in the prefix cache are the request's (the
        # others share its rBlocks, which is no cache hit); every output of the parent says so.
        self._num_cached_tokens: int | None = None

    @property
    def streams(self) -> bool:
        """Whether each sample's progress is emitted (not when ``best_of`` picks among more)."""
        return self.params.num_samples == self.params.n

    def unfinished_child_ids(self) -> list[str]:
        return [c.request_id for c in self.children if c.request_id in self._unfinished]

    def add(self, output: RequestOutput) -> list[RequestOutput]:
        """A child's output in; what the parent emits for it (module docstring)."""
        index = self.index[output.request_id]
        (completion,) = output.outputs
        completion.index = index
        self._latest[index] = output
        if index == 0 and output.prompt_logprobs is not None:
            self._prompt_logprobs = output.prompt_logprobs
            self._prompt_logprob_ranks = output.prompt_logprob_ranks
        if index == 0 and output.num_cached_tokens is not None:
            self._num_cached_tokens = output.num_cached_tokens
        if output.finished:
            self._unfinished.discard(output.request_id)
        emitted = []
        if self.streams:
            emitted.append(
                replace(
                    output,
                    request_id=self.request_id,
                    finished=False,
                    outputs=[completion],
                    prompt_logprobs=self._prompt_logprobs,
                    prompt_logprob_ranks=self._prompt_logprob_ranks,
                    num_cached_tokens=self._num_cached_tokens,
                )
            )
        if not self._unfinished:
            emitted.append(self._final())
        return emitted

    def _final(self) -> RequestOutput:
        latest = [self._latest[i] for i in sorted(self._latest)]
        completions = [out.outputs[0] for out in latest]
        if not self.streams:
            ranked = sorted(completions, key=_cumulative_logprob, reverse=True)
            completions = [
                replace(
                    c,
                    index=i,
                    logprobs=c.logprobs if self.params.logprobs is not None else None,
                )
                for i, c in enumerate(ranked[: self.params.n])
            ]
        metrics = [out.metrics for out in latest if out.metrics is not None]
        first = latest[0]
        return RequestOutput(
            request_id=self.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=self._prompt_logprobs,
            prompt_logprob_ranks=self._prompt_logprob_ranks,
            outputs=completions,
            finished=True,
            metrics=_merged(metrics) if metrics else None,
            num_cached_tokens=self._num_cached_tokens,
        )


def _cumulative_logprob(completion: CompletionOutput) -> float:
    logprob = completion.cumulative_logprob
    return float("-inf") if logprob is None else logprob


def _merged(metrics: list[RequestMetrics]) -> RequestMetrics:
    """The parent's metrics: its first token is the first of any sample, it finished with the
    last one, and every sample's preemptions count."""
    firsts = [m.first_token_time for m in metrics if m.first_token_time is not None]
    ends = [m.finished_time for m in metrics if m.finished_time is not None]
    return RequestMetrics(
        arrival_time=min(m.arrival_time for m in metrics),
        first_token_time=min(firsts, default=None),
        finished_time=max(ends, default=None),
        num_preemptions=sum(m.num_preemptions for m in metrics),
    )
