"""Trace generator: seeded, Poisson arrivals at the asked rate, the mix and the length ranges."""

from __future__ import annotations

import math
import statistics

import pytest

from infinite_llm.sim.trace import TRACES, LengthDist, generate_trace


def test_same_seed_same_trace_other_seed_differs():
    a = generate_trace("longtail", 200, 5.0, seed=3)
    b = generate_trace("longtail", 200, 5.0, seed=3)
    c = generate_trace("longtail", 200, 5.0, seed=4)
    assert a.requests == b.requests
    assert a.requests != c.requests


def test_poisson_arrivals_at_the_rate():
    trace = generate_trace("chat", 4000, 8.0, seed=1)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace.requests, trace.requests[1:])]
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8.0, rel=0.1)  # exponential: sd = mean


def test_infinite_rate_arrives_at_once():
    trace = generate_trace("chat", 10, math.inf)
    assert {r.arrival_s for r in trace.requests} == {0.0}


def test_longtail_mix_and_ranges():
    trace = generate_trace("longtail", 5000, 10.0, seed=0)
    stats = trace.stats()
    kinds = stats["kinds"]
    assert kinds["chat"] / 5000 == pytest.approx(0.80, abs=0.03)
    assert kinds["docs"] / 5000 == pytest.approx(0.15, abs=0.02)
    assert kinds["long"] / 5000 == pytest.approx(0.05, abs=0.01)
    classes = {c.name: c for c in TRACES["longtail"].classes}
    for r in trace.requests:
        cls = classes[r.kind]
        assert cls.prompt.lo <= r.prompt_len <= cls.prompt.hi
        assert cls.output.lo <= r.output_len <= cls.output.hi
    chat = sorted(r.prompt_len for r in trace.requests if r.kind == "chat")
    assert statistics.median(chat) == pytest.approx(600, rel=0.1)  # the lognormal's median
    assert stats["context_max"] > 500_000  # the long tail reaches far
    assert stats["context_p50"] < 3_000


def test_max_context_truncates_without_a_pile_up():
    trace = generate_trace("longtail", 3000, 10.0, seed=0, max_context=100_000)
    assert max(r.num_tokens for r in trace.requests) <= 100_000
    long = [r.num_tokens for r in trace.requests if r.kind == "long"]
    assert len(set(long)) > len(long) // 2  # sampled below the cap, not clipped to it


def test_scale_keeps_the_shape():
    full = generate_trace("docs", 2000, 1.0, seed=2)
    small = generate_trace("docs", 2000, 1.0, seed=2, scale=0.01, output_scale=0.1)
    med_full = statistics.median(r.prompt_len for r in full.requests)
    med_small = statistics.median(r.prompt_len for r in small.requests)
    assert med_small == pytest.approx(med_full * 0.01, rel=0.05)
    assert statistics.median(r.output_len for r in small.requests) == pytest.approx(20, rel=0.15)


def test_length_dist_validates():
    with pytest.raises(ValueError):
        LengthDist(10, 5)
    with pytest.raises(ValueError):
        LengthDist(1, 5, median=2)
    with pytest.raises(ValueError):
        generate_trace("nope", 1, 1.0)
