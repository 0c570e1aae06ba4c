"""Logprobs in the two OpenAI shapes: completions (parallel lists) and chat (one entry per token).

The engine gives, per token, ``{token_id: logprob}`` holding the token and the top-k asked
for (None for the first token of an echoed prompt, which has no logprob); tokens are shown as
their own decoded text, as vLLM does, or as ``token_id:<id>`` when the request asks
(``return_tokens_as_token_ids``: a token that is not valid UTF-8 on its own stays exact).
``text_offset`` counts the tokens' own text, so streamed and whole answers agree whatever a
stop string held back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._token_text(token_id)

    def text_length(self, token_ids: Sequence[int]) -> int:
        """Characters the tokens' own texts take: what ``text_offset`` advances by."""
        return sum(len(self._token_text(t)) for t in token_ids)

    def _shown(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self._token_text(token_id)

    def completion(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[dict[int, float] | None],
        text_offset: int = 0,
        as_ids: bool = False,
    ) -> dict[str, Any]:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (``text_offset`` counts
        characters from the start of the text, plus ``text_offset`` given)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float | None] | None] = []
        offsets: list[int] = []
        offset = text_offset
        for token_id, entry in zip(token_ids, logprobs):
            tokens.append(self._shown(token_id, as_ids))
            offsets.append(offset)
            offset += len(self._token_text(token_id))
            if entry is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(_finite(entry.get(token_id)))
            ranked: dict[str, float | None] = {}
            for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
                # the same text twice: keep the likelier
                ranked.setdefault(self._shown(t, as_ids), _finite(lp))
            top.append(ranked)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chat(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[dict[int, float]],
        top_k: int,
        as_ids: bool = False,
    ) -> dict[str, Any]:
        """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...top_k]}]}``
        (``top_k`` -1: every token the engine gave)."""
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])
            if top_k >= 0:
                ranked = ranked[:top_k]
            content.append(
                {
                    **self._chat_entry(token_id, entry.get(token_id), as_ids),
                    "top_logprobs": [self._chat_entry(t, lp, as_ids) for t, lp in ranked],
                }
            )
        return {"content": content}

    def prompt(
        self,
        logprobs: Sequence[dict[int, float] | None] | None,
        ranks: Sequence[int | None] | None,
        prompt_token_ids: Sequence[int],
    ) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's ``prompt_logprobs``: per prompt token None (the first) or
        ``{token_id: {"logprob", "rank", "decoded_token"}}``: the prompt token's rank in the
        whole vocabulary, the top k ranked 1..k (as vLLM's ``Logprob``)."""
        if logprobs is None:
            return None
        out: list[dict[str, dict[str, Any]] | None] = []
        for i, entry in enumerate(logprobs):
            if entry is None:
                out.append(None)
                continue
            prompt_token = prompt_token_ids[i]
            prompt_rank = ranks[i] if ranks is not None and i < len(ranks) else None
            by_rank = sorted(entry, key=lambda t: -entry[t])  # the prompt's token sorts last
            out.append(
                {
                    str(t): {
                        "logprob": _finite(entry[t]),
                        "rank": prompt_rank if t == prompt_token and prompt_rank else r + 1,
                        "decoded_token": self._token_text(t),
                    }
                    for r, t in enumerate(by_rank)
                }
            )
        return out

    def _chat_entry(self, token_id: int, logprob: float | None, as_ids: bool) -> dict[str, Any]:
        text = self._token_text(token_id)
        value = _finite(logprob)
        return {
            "token": self._shown(token_id, as_ids),
            "logprob": -9999.0 if value is None else value,
            "bytes": list(text.encode("utf-8")),
        }


def _finite(value: float | None) -> float | None:
    """JSON has no -inf: OpenAI and vLLM send -9999.0 for an impossible token."""
    if value is None:
        return None
    return value if math.isfinite(value) else -9999.0
