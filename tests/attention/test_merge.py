"""The log-sum-exp merge: exact, order-free, empty shards are no-ops, stable over huge ranges."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinite_llm.attention import cpu_native
from infinite_llm.attention.merge import merge_attention_states, merge_attention_states_, merge_into

INF = float("inf")


@pytest.fixture(params=["torch", "native"])
def merge_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """merge_into runs in C where the native library is built; its torch path must agree."""
    if request.param == "torch":
        monkeypatch.setitem(cpu_native._state, "lib", None)
    elif not cpu_native.native_available():
        pytest.skip("native kernel could not be built here")
    return request.param


def _parts(gen: torch.Generator, num_parts: int, rows: int, heads: int, d: int, spread: float):
    """Partial states whose lse spread over ``spread``, some rows of some parts empty (-inf)."""
    outs, lses = [], []
    for _ in range(num_parts):
        lse = (torch.rand(rows, heads, generator=gen) - 0.5) * spread
        lse[torch.rand(rows, heads, generator=gen) < 0.2] = -INF
        out = torch.randn(rows, heads, d, generator=gen)
        out[torch.isinf(lse)] = 0.0  # what every kernel returns for a row without keys
        outs.append(out)
        lses.append(lse)
    return outs, lses


def _truth(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(torch.stack([x.double() for x in lses]), 0)
    out = torch.zeros(outs[0].shape, dtype=torch.float64)
    for o, x in zip(outs, lses):
        w = torch.exp(x.double() - lse).nan_to_num(0.0)  # both -inf: weight 0
        out += o.double() * w[..., None]
    return out, lse


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    num_parts=st.integers(1, 9),
    rows=st.integers(1, 6),
    spread=st.sampled_from([1.0, 30.0, 1e4, 1e6]),
    seed=st.integers(0, 2**20),
)
def test_merge_is_exact_and_order_free(
    merge_path: str, num_parts: int, rows: int, spread: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    outs, lses = _parts(gen, num_parts, rows, 3, 8, spread)
    ref_out, ref_lse = _truth(outs, lses)
    tol = 1e-5  # whatever the spread: only differences of lse reach the exponentials
    order = list(range(num_parts))
    random.Random(seed).shuffle(order)
    for perm in (order, list(range(num_parts))):
        out, lse = merge_attention_states([outs[j] for j in perm], [lses[j] for j in perm])
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        assert (out.double() - ref_out).abs().max() <= tol
        finite = ~torch.isinf(ref_lse)
        assert torch.allclose(lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-5)
    # into the first state's own tensors: the same numbers, the other states untouched
    first_out, first_lse = outs[0].clone(), lses[0].clone()
    others = [(o.clone(), x.clone()) for o, x in zip(outs[1:], lses[1:])]
    got_out, got_lse = merge_attention_states_(
        [first_out, *(o for o, _ in others)], [first_lse, *(x for _, x in others)]
    )
    assert got_out is first_out and got_lse is first_lse
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)  # out: the last perm's
    assert all(
        torch.equal(o, a) and torch.equal(x, b) for (o, x), a, b in zip(others, outs[1:], lses[1:])
    )
    # pairwise in place (what DistAttention does), same answer
    out, lse = outs[0].clone(), lses[0].clone()
    for o, x in zip(outs[1:], lses[1:]):
        merge_into(out, lse, None, o, x)
    assert (out.double() - ref_out).abs().max() <= tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_empty_shard_is_a_no_op(merge_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, 8, generator=gen)
    lse = torch.randn(4, 3, generator=gen)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, -INF)
    got_out, got_lse = merge_attention_states(
        [empty_out, out, empty_out], [empty_lse, lse, empty_lse]
    )
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    all_empty_out, all_empty_lse = merge_attention_states(
        [empty_out, empty_out], [empty_lse, empty_lse]
    )
    assert torch.equal(all_empty_out, empty_out) and torch.equal(all_empty_lse, empty_lse)
    first_out, first_lse = empty_out.clone(), empty_lse.clone()
    got_out, got_lse = merge_attention_states_([first_out, out], [first_lse, lse])
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    run_out, run_lse = out.clone(), lse.clone()
    merge_into(run_out, run_lse, None, empty_out, empty_lse)
    assert torch.equal(run_out, out) and torch.equal(run_lse, lse)


def test_huge_lse_gap_keeps_the_dominant_part(merge_path: str) -> None:
    """lse differing by 1e4: the small part's weight underflows to exactly 0, nothing overflows."""
    gen = torch.Generator().manual_seed(1)
    big, small = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    big_lse, small_lse = torch.full((2, 3), 1e4), torch.full((2, 3), 0.0)
    for parts in (([big, small], [big_lse, small_lse]), ([small, big], [small_lse, big_lse])):
        out, lse = merge_attention_states(*parts)
        assert torch.equal(out, big) and torch.equal(lse, big_lse)
    neg = torch.full((2, 3), -1e4)  # both far below zero: equal weights, still exact
    out, lse = merge_attention_states([big, small], [neg, neg])
    assert torch.equal(out, (big + small) / 2)
    assert torch.allclose(
        lse, neg + torch.log(torch.tensor(2.0)), rtol=0, atol=1e-3
    )  # ulp(1e4) ~ 1e-3
    out, lse = big.clone(), neg.clone()
    merge_into(out, lse, None, small, neg)
    assert torch.equal(out, (big + small) / 2)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.integers(2, 10), seed=st.integers(0, 2**20))
def test_merge_into_rows_subset(merge_path: str, rows: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    (out, part), (lse, part_lse) = _parts(gen, 2, rows, 2, 4, 20.0)
    pick = torch.tensor(
        sorted(random.Random(seed).sample(range(rows), rows // 2)), dtype=torch.long
    )
    ref_out, ref_lse = out.clone(), lse.clone()
    merged_out, merged_lse = merge_attention_states(
        [out[pick], part[pick]], [lse[pick], part_lse[pick]]
    )
    ref_out[pick], ref_lse[pick] = merged_out, merged_lse
    merge_into(out, lse, pick, part[pick], part_lse[pick])
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.equal(
        torch.isinf(lse), torch.isinf(ref_lse)
    )
    finite = ~torch.isinf(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-6)


def test_bfloat16_states_merge_as_their_float32_values(merge_path: str) -> None:
    gen = torch.Generator().manual_seed(3)
    outs, lses = _parts(gen, 4, 5, 3, 16, 30.0)
    half = [o.to(torch.bfloat16) for o in outs]
    out, lse = merge_attention_states(half, lses)
    ref_out, ref_lse = _truth([o.float() for o in half], lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() <= 1e-2  # one bfloat16 rounding of the result
    finite = ~torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-5)


def test_in_place_merge_of_bfloat16_states(merge_path: str) -> None:
    """The native in-place merge takes float32 states only; bfloat16 ones merge in float32 and
    are rounded once into the first state, as the out-of-place merge rounds its result."""
    gen = torch.Generator().manual_seed(2)
    outs, lses = _parts(gen, 3, 4, 3, 16, 20.0)
    outs = [o.to(torch.bfloat16) for o in outs]
    want_out, want_lse = merge_attention_states(outs, lses)
    first_out, first_lse = outs[0].clone(), lses[0].clone()
    got_out, got_lse = merge_attention_states_([first_out, *outs[1:]], [first_lse, *lses[1:]])
    assert got_out is first_out and got_out.dtype == torch.bfloat16
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)
