"""``StepEvent``: what a request did in one step, as plain picklable data for any transport."""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.engine.sampler import SampledToken


@dataclass(frozen=True, slots=True)
class StepEvent:
    request_id: str
    sampled: SampledToken | None  # None: a prefill chunk without a token yet, or an abort
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None: still running
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # {token: logprob} (the prompt's token and the top k) for the prompt tokens this step's
    # chunk reached, when the request asked for prompt_logprobs.
    prompt_logprobs: list[dict[int, float]] | None = None
    # Prompt tokens the request found cached when first admitted (None: not admitted yet).
    num_cached_tokens: int | None = None
    # With prompt_logprobs: each of those prompt tokens' rank in the vocabulary.
    prompt_logprob_ranks: list[int] | None = None
