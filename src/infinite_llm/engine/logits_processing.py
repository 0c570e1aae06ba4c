"""What a request's own parameters do to its logits before a token is picked, batched.

In vLLM's order: ``allowed_token_ids`` (everything else to -inf), ``min_tokens`` (stopping
tokens to -inf until enough output exists), ``logit_bias`` (added), then the penalties:

- ``repetition_penalty`` r: a token seen in the prompt or the output has its logit divided by
  r when positive, multiplied by r otherwise (CTRL's rule, as transformers and vLLM apply it);
- ``frequency_penalty`` f: minus f times the token's count in the output so far;
- ``presence_penalty`` p: minus p once if the token is in the output at all.

Each is one batched tensor operation over the rows that use it (token counts come from one
``bincount`` over all of those rows), so a batch costs a few ops whatever its size, and rows
that use none pay nothing. State is rebuilt from the request's tokens each step, so a
preempted or migrated request needs nothing restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from infinite_llm.scheduler.request import Request


def process_logits(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """logits: [N, vocab] float32, row i for ``requests[i]``; modified in place and returned."""
    _allowed_tokens(logits, requests)
    _min_tokens(logits, requests)
    _logit_bias(logits, requests)
    _penalties(logits, requests)
    return logits


def _allowed_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.allowed_token_ids]
    if not rows:
        return
    allowed = [requests[i].sampling_params.allowed_token_ids or [] for i in rows]
    local = torch.repeat_interleave(
        torch.arange(len(rows)), torch.tensor([len(a) for a in allowed])
    )
    banned = torch.ones(len(rows), logits.shape[1], dtype=torch.bool)
    banned[local, torch.tensor(list(chain.from_iterable(allowed)), dtype=torch.long)] = False
    index = torch.tensor(rows)
    logits[index] = logits[index].masked_fill(banned, float("-inf"))


def _min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, request in enumerate(requests):
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            continue
        banned = list(params.stop_token_ids or [])
        if not params.ignore_eos and request.eos_token_id is not None:
            banned.append(request.eos_token_id)
        row_ids.extend([i] * len(banned))
        token_ids.extend(banned)
    if row_ids:
        logits[torch.tensor(row_ids), torch.tensor(token_ids)] = float("-inf")


def _logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i, request in enumerate(requests):
        bias = request.sampling_params.logit_bias
        if bias:
            row_ids.extend([i] * len(bias))
            token_ids.extend(bias.keys())
            biases.extend(bias.values())
    if row_ids:
        logits.index_put_(
            (torch.tensor(row_ids), torch.tensor(token_ids)),
            torch.tensor(biases, dtype=logits.dtype),
            accumulate=True,
        )


def _penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
    if not rows:
        return
    vocab = logits.shape[1]
    chosen = [requests[i] for i in rows]
    params = [r.sampling_params for r in chosen]
    counts = _bincount_rows([r.output_token_ids for r in chosen], vocab)
    index = torch.tensor(rows)
    sub = logits[index]
    repetition = torch.tensor([p.repetition_penalty for p in params], dtype=sub.dtype)
    if bool((repetition != 1.0).any()):
        seen = (counts > 0) | (_bincount_rows([r.prompt_token_ids for r in chosen], vocab) > 0)
        r = torch.where(seen, repetition[:, None], torch.ones((), dtype=sub.dtype))
        sub = torch.where(sub > 0, sub / r, sub * r)
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=sub.dtype)
    presence = torch.tensor([p.presence_penalty for p in params], dtype=sub.dtype)
    sub -= frequency[:, None] * counts + presence[:, None] * (counts > 0).to(sub.dtype)
    logits[index] = sub


def _bincount_rows(token_lists: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token in each list (one ``bincount``)."""
    lengths = torch.tensor([len(t) for t in token_lists])
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    counts = torch.bincount(rows * vocab + flat, minlength=len(token_lists) * vocab)
    return counts.view(len(token_lists), vocab).float()
