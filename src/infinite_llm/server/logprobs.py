"""Logprobs in the two OpenAI shapes: completions (parallel lists) and chat (one entry per token).

The engine gives, per generated token, ``{token_id: logprob}`` holding the sampled token and
the top-k asked for; tokens are shown as their own decoded text, as vLLM does.
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

    def completion(
        self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]], text_offset: int = 0
    ) -> dict[str, Any]:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (``text_offset`` counts
        characters from the start of the completion text, plus ``text_offset`` given)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float | None]] = []
        offsets: list[int] = []
        offset = text_offset
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(_finite(entry.get(token_id)))
            ranked: dict[str, float | None] = {}
            for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
                ranked.setdefault(
                    self.token_text(t), _finite(lp)
                )  # same text twice: keep the likelier
            top.append(ranked)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chat(
        self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]], top_k: int
    ) -> dict[str, Any]:
        """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...top_k]}]}``."""
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_k]
            content.append(
                {
                    **self._chat_entry(token_id, entry.get(token_id)),
                    "top_logprobs": [self._chat_entry(t, lp) for t, lp in ranked],
                }
            )
        return {"content": content}

    def _chat_entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        text = self.token_text(token_id)
        value = _finite(logprob)
        return {
            "token": text,
            "logprob": -9999.0 if value is None else value,
            "bytes": list(text.encode("utf-8")),
        }


def _finite(value: float | None) -> float | None:
    """JSON has no -inf: OpenAI and vLLM send -9999.0 for an impossible token."""
    if value is None:
        return None
    return value if math.isfinite(value) else -9999.0
