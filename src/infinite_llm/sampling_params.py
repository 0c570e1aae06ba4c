"""``SamplingParams``: how to pick each next token, and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling and stopping; invalid values raise ``ValueError`` naming the field.

    temperature 0 means greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those filters.
    ``seed`` makes a request's random choices reproducible on its own, whatever else is batched.
    ``logprobs``: None for none, k >= 0 for the sampled token's logprob plus the k most likely.
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
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
            f"seed must be an integer, got {self.seed!r}",
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
        check(
            self.logprobs is None
            or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
            f"logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.logprobs!r}",
        )

    @property
    def num_samples(self) -> int:
        """How many samples are generated: ``best_of``, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # excludes NaN
