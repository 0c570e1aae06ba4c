"""What ``LLM.generate`` returns: vLLM's ``RequestOutput`` / ``CompletionOutput`` shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} for the sampled token and the top-k asked for.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt
    # token {token_id: logprob} holding that token and the top k.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # With prompt_logprobs: per prompt token (None for the first) its rank in the vocabulary.
    prompt_logprob_ranks: list[int | None] | None = None
    # Only set when streaming: the text and tokens added since the previous output.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    # Prompt tokens whose KV came from the prefix cache (vLLM's name); None until admitted.
    num_cached_tokens: int | None = None
