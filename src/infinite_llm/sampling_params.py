"""``SamplingParams``: how to pick each next token, and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.structured_outputs import StructuredOutputsParams


@dataclass
class SamplingParams:
    """Per-request sampling and stopping; invalid values raise ``ValueError`` naming the field.

    temperature 0 means greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those filters.
    ``seed`` makes a request's random choices reproducible on its own, whatever else is batched.
    ``logprobs``: None for none, k >= 0 for the sampled token's logprob plus the k most likely,
    -1 for every token of the vocabulary (the engine caps k at its ``max_logprobs``).
    ``prompt_logprobs``: the same for each prompt token (the first has none).
    Penalties, ``logit_bias`` and ``allowed_token_ids`` act as in vLLM
    (``engine/logits_processing.py``). ``truncate_prompt_tokens``: keep only the last k prompt
    tokens (the first k with ``truncation_side="right"``; -1: as many as the model takes).
    ``n`` samples are returned per prompt; ``best_of`` (None: ``n``) are generated and the ``n``
    with the highest cumulative logprob returned, best first. With a ``seed``, sample i draws
    from ``seed + i``.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "left"
    structured_outputs: StructuredOutputsParams | None = None  # the output must match it
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = (self.stop,)
        elif self.stop is None:
            self.stop_strings = ()
        else:
            if not all(isinstance(s, str) for s in self.stop):
                raise ValueError("stop must be a string or a list of strings")
            self.stop_strings = tuple(self.stop)
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.seed == -1:  # vLLM's spelling of "no seed"
            self.seed = None
        self.logit_bias = _token_bias(self.logit_bias)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(
            isinstance(self.n, int) and not isinstance(self.n, bool) and self.n >= 1,
            f"n must be at least 1, got {self.n!r}",
        )
        check(
            self.best_of is None
            or (
                isinstance(self.best_of, int)
                and not isinstance(self.best_of, bool)
                and self.best_of >= self.n
            ),
            f"best_of must be at least n ({self.n}), got {self.best_of!r}",
        )
        check(
            _is_number(self.temperature) and self.temperature >= 0.0,
            f"temperature must be >= 0, got {self.temperature!r}",
        )
        check(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1,
            f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}",
        )
        check(
            _is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63),  # type: ignore[operator]
            f"seed must be a 64-bit signed integer, got {self.seed!r}",
        )
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be at least 1, got {self.max_tokens!r}",
        )
        check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            f"min_tokens must be >= 0, got {self.min_tokens!r}",
        )
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids or []),
            "stop_token_ids must be non-negative integers",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(
                value is None or (_is_int(value) and value >= -1),
                f"{name} must be non-negative or -1, got {value!r}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(
                _is_number(value) and -2.0 <= value <= 2.0,
                f"{name} must be in [-2, 2], got {value!r}",
            )
        check(
            _is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < float("inf"),
            f"repetition_penalty must be a finite number greater than zero, got {self.repetition_penalty!r}",
        )
        check(
            self.allowed_token_ids is None
            or (
                isinstance(self.allowed_token_ids, list)
                and len(self.allowed_token_ids) > 0
                and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)
            ),
            "allowed_token_ids must be a non-empty list of token ids",
        )
        check(
            self.truncate_prompt_tokens is None
            or (_is_int(self.truncate_prompt_tokens) and self.truncate_prompt_tokens >= -1),
            f"truncate_prompt_tokens must be >= -1, got {self.truncate_prompt_tokens!r}",
        )
        check(
            self.truncation_side in ("left", "right"),
            f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}",
        )
        check(
            self.structured_outputs is None
            or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs must be a StructuredOutputsParams",
        )

    @property
    def num_samples(self) -> int:
        """How many samples are generated: ``best_of``, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def token_ids_used(self) -> dict[str, list[int]]:
        """The fields that name token ids, for the engine to check against its vocabulary."""
        return {
            "stop_token_ids": list(self.stop_token_ids or []),
            "logit_bias": list(self.logit_bias or {}),
            "allowed_token_ids": list(self.allowed_token_ids or []),
        }


def _token_bias(bias: object) -> dict[int, float] | None:
    """``logit_bias`` with integer keys (OpenAI sends them as strings), each clamped to
    [-100, 100] as OpenAI documents; ``ValueError`` naming a bad key or value."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must map token ids to numbers")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
        if token < 0 or (isinstance(key, float) and key != token):
            raise ValueError(f"logit_bias: key {key!r} is not a token id")
        if not _is_number(value) or abs(value) == float("inf"):
            raise ValueError(f"logit_bias: the bias of token {key} must be a finite number")
        out[token] = min(100.0, max(-100.0, float(value)))
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # excludes NaN
