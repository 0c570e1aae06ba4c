"""Pick the next token of each request from its logits: the request's logits processing, then
greedy, temperature, top-k/p, min-p, seeds; logprobs of the model's own distribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infinite_llm.engine.logits_processing import process_logits
from infinite_llm.engine.structured import StructuredOutputs
from infinite_llm.scheduler.request import Request


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # log-probability under the model (before temperature and filters)
    top_logprobs: dict[int, float] | None = None


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """logits: [V] (already divided by temperature) -> logits with filtered entries at -inf."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (always keep the first).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    requests: Sequence[Request],
    structured: StructuredOutputs | None = None,
) -> list[SampledToken]:
    """logits: [N, vocab] float32, row i for requests[i]; ``structured`` masks the rows of
    grammar-constrained requests (their matchers advance after sampling: ``accept``)."""
    logits = logits.float()
    # The grammar's mask first: logprobs are over the tokens it allows (as vLLM reports them),
    # before the request's own processing.
    constrained = [] if structured is None else structured.rows(requests)
    if structured is not None:
        structured.apply_bitmask(logits, requests, constrained)
    want_logprobs = any(r.sampling_params.logprobs is not None for r in requests)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    grammar_only = logits[constrained].clone() if constrained else None
    process_logits(logits, requests)
    if grammar_only is not None:
        # A row the request's own rules left empty (min_tokens forbidding the EOS that completes
        # the grammar, allowed_token_ids outside it): the grammar wins.
        dead = torch.isneginf(logits[constrained]).all(dim=-1)
        if bool(dead.any()):
            rows = torch.tensor(constrained)[dead]
            logits[rows] = grammar_only[dead]

    token_ids = [0] * len(requests)
    greedy_rows = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
    if greedy_rows:
        every = len(greedy_rows) == len(requests)  # no copy of the logits when all rows are greedy
        picks = (logits if every else logits[greedy_rows]).argmax(dim=-1).tolist()
        for row, token in zip(greedy_rows, picks):
            token_ids[row] = token
    for i, request in enumerate(requests):
        params = request.sampling_params
        if params.greedy:
            continue
        row = _filter(logits[i] / params.temperature, params.top_k, params.top_p, params.min_p)
        probs = torch.softmax(row, dim=-1)
        token_ids[i] = int(torch.multinomial(probs, 1, generator=request.generator).item())

    results = []
    for i, request in enumerate(requests):
        k = request.sampling_params.logprobs
        if k is None or logprobs is None:
            results.append(SampledToken(token_ids[i]))
            continue
        row = logprobs[i]
        top: dict[int, float] = {}
        if k != 0:
            values, indices = torch.topk(row, row.shape[0] if k < 0 else k)  # -1: every token
            top = dict(zip(indices.tolist(), values.tolist()))
        chosen = float(row[token_ids[i]])
        top[token_ids[i]] = chosen
        results.append(SampledToken(token_ids[i], chosen, top))
    return results
