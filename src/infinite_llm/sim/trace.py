"""Request traces shared by the simulator and the real benchmark: context mixes, Poisson arrivals.

A trace is a seeded list of requests (arrival time, prompt length, output length, class).
The mixes follow the paper's kind of workload: short chat, long documents, and a long
tail of very long contexts (the paper serves up to 1,900K tokens). Lengths are given at
data-center scale (an A100 instance of LLaMA2-7B holds about 118K tokens of KV);
``scale`` multiplies prompt lengths and ``output_scale`` output lengths, so a run on this
CPU uses small contexts and pools while keeping each distribution's shape.

Each length distribution is a lognormal (median, sigma) or a log-uniform, truncated to its
[lo, hi] range; ``max_context`` truncates further (prompt + output), sampling from the
renormalised distribution rather than clipping (no pile-up at the cap).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist


@dataclass(frozen=True)
class LengthDist:
    """Lognormal with ``median`` and ``sigma`` (of the log), or log-uniform when ``sigma`` is
    None; truncated to [lo, hi] tokens (before scaling)."""

    lo: int
    hi: int
    median: float | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"need 1 <= lo <= hi, got [{self.lo}, {self.hi}]")
        if (self.sigma is None) != (self.median is None):
            raise ValueError("give both median and sigma (lognormal) or neither (log-uniform)")

    def sample(self, rng: random.Random, scale: float = 1.0, cap: float | None = None) -> int:
        lo, hi = self.lo * scale, self.hi * scale
        if cap is not None:
            hi = min(hi, cap)
            lo = min(lo, hi)
        u = rng.random()
        if self.sigma is None or self.median is None or hi <= lo:
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            dist = NormalDist(math.log(self.median * scale), self.sigma)
            a, b = dist.cdf(math.log(lo)), dist.cdf(math.log(hi))
            p = a + u * (b - a)
            x = math.exp(dist.inv_cdf(min(max(p, 1e-12), 1 - 1e-12))) if b > a else lo
        return max(1, min(round(x), math.floor(hi) if hi >= 1 else 1))


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float
    prompt: LengthDist
    output: LengthDist


@dataclass(frozen=True)
class TraceSpec:
    name: str
    description: str
    classes: tuple[RequestClass, ...]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    kind: str

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class Trace:
    name: str
    seed: int
    rate: float  # requests per second, whole cluster
    scale: float
    output_scale: float
    max_context: int | None
    requests: tuple[TraceRequest, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.requests)

    def stats(self) -> dict[str, float | int | dict[str, int]]:
        return trace_stats(self.requests)


CHAT = RequestClass(
    "chat",
    1.0,
    prompt=LengthDist(8, 16_000, median=600, sigma=1.0),  # ShareGPT-like conversations
    output=LengthDist(8, 2_000, median=250, sigma=0.8),
)
DOCS = RequestClass(
    "docs",
    1.0,
    prompt=LengthDist(2_000, 100_000, median=16_000, sigma=0.7),  # long-document QA, summaries
    output=LengthDist(16, 1_000, median=200, sigma=0.6),
)
LONG = RequestClass(
    "long",
    1.0,
    prompt=LengthDist(32_000, 2_000_000),  # log-uniform: books, repositories, long sessions
    output=LengthDist(16, 1_000, median=300, sigma=0.5),
)


def _weighted(cls: RequestClass, weight: float) -> RequestClass:
    return RequestClass(cls.name, weight, cls.prompt, cls.output)


TRACES: dict[str, TraceSpec] = {
    "chat": TraceSpec("chat", "short chat only (not memory-starved)", (CHAT,)),
    "docs": TraceSpec("docs", "long documents only", (DOCS,)),
    "longtail": TraceSpec(
        "longtail",
        "the paper's kind of mix: 80% chat, 15% long documents, 5% very long contexts (32K-2M)",
        (_weighted(CHAT, 0.80), _weighted(DOCS, 0.15), _weighted(LONG, 0.05)),
    ),
}


def generate_trace(
    spec: TraceSpec | str,
    num_requests: int,
    rate: float,
    *,
    seed: int = 0,
    scale: float = 1.0,
    output_scale: float | None = None,
    max_context: int | None = None,
) -> Trace:
    """``num_requests`` requests with Poisson arrivals at ``rate`` per second (inf: all at 0)."""
    if isinstance(spec, str):
        if spec not in TRACES:
            raise ValueError(f"unknown trace {spec!r}; choose from {', '.join(TRACES)}")
        spec = TRACES[spec]
    if num_requests < 0 or rate <= 0 or scale <= 0:
        raise ValueError("num_requests must be >= 0, rate and scale > 0")
    output_scale = scale if output_scale is None else output_scale
    if max_context is not None and max_context < 2:
        raise ValueError("max_context must be at least 2 tokens (a prompt and one output)")
    rng = random.Random(seed)
    weights = [c.weight for c in spec.classes]
    requests = []
    t = 0.0
    for index in range(num_requests):
        if math.isfinite(rate):
            t += rng.expovariate(rate)
        cls = rng.choices(spec.classes, weights)[0]
        out_cap = None if max_context is None else max_context - 1
        output_len = cls.output.sample(rng, output_scale, out_cap)
        prompt_cap = None if max_context is None else max_context - output_len
        prompt_len = cls.prompt.sample(rng, scale, prompt_cap)
        requests.append(TraceRequest(index, t, prompt_len, output_len, cls.name))
    return Trace(spec.name, seed, rate, scale, output_scale, max_context, tuple(requests))


def trace_stats(requests: Sequence[TraceRequest]) -> dict[str, float | int | dict[str, int]]:
    """Counts, mean and percentiles of the context lengths, and arrival span of a trace."""
    if not requests:
        return {"num_requests": 0}
    ctx = sorted(r.num_tokens for r in requests)
    kinds: dict[str, int] = {}
    for r in requests:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1

    def q(p: float) -> int:
        return ctx[min(len(ctx) - 1, int(p * len(ctx)))]

    return {
        "num_requests": len(requests),
        "kinds": kinds,
        "context_mean": statistics.fmean(ctx),
        "context_p50": q(0.5),
        "context_p90": q(0.9),
        "context_p99": q(0.99),
        "context_max": ctx[-1],
        "prompt_tokens": sum(r.prompt_len for r in requests),
        "output_tokens": sum(r.output_len for r in requests),
        "arrival_span_s": requests[-1].arrival_s,
    }
