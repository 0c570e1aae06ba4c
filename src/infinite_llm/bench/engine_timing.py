"""How ``bench engine`` times a run and turns it into rates, the same for every engine: the
prompts, a timed call, each step's outputs as a ``Step``, and prefill and decode rates from them
(the method is in ``bench/engine.py``'s docstring)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# One step of a timed run: (seconds since the run started, requests that got a token in it,
# of which first tokens).
Step = tuple[float, int, int]


def decode_rate(steps: list[Step], batch: int) -> dict[str, Any]:
    """Decode throughput from a run's steps (see the module docstring): the full-batch decode
    steps are those after the last first token in which all ``batch`` requests got a token."""
    starts = [i for i, (_, _, first) in enumerate(steps) if first]
    begin = starts[-1] + 1 if starts else 1
    times = [
        steps[i][0] - steps[i - 1][0] for i in range(begin, len(steps)) if steps[i][1] == batch
    ]
    if not times:
        return {
            "decode_tok_s": None,
            "decode_step_ms": None,
            "decode_step_ms_median": None,
            "decode_steps": 0,
        }
    return {
        "decode_tok_s": batch * len(times) / sum(times),
        "decode_step_ms": sum(times) / len(times) * 1e3,
        "decode_step_ms_median": statistics.median(times) * 1e3,
        "decode_steps": len(times),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rates(
    b: int, prompt_len: int, t_prefill: float, t_total: float, steps: list[Step]
) -> dict[str, Any]:
    return {
        "prefill_s": t_prefill,
        "total_s": t_total,
        "prefill_tok_s": b * prompt_len / t_prefill,
        **decode_rate(steps, b),
    }


class StepCounter:
    """Turns each step's outputs (cumulative token ids per request) into a ``Step``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.lengths: dict[str, int] = {}
        self.steps: list[Step] = []

    def record(self, outputs: list[Any]) -> None:
        t = time.perf_counter() - self.start
        new = first = 0
        for out in outputs:
            n, before = len(out.outputs[0].token_ids), self.lengths.get(out.request_id, 0)
            if n > before:
                new, first = new + 1, first + (before == 0)
            self.lengths[out.request_id] = n
        self.steps.append((t, new, first))
