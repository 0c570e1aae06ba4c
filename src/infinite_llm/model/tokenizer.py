"""The tokenizer and chat template of a model, from the same source as its weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Tokenizer:
    """Thin wrapper over a transformers fast tokenizer: the few calls the engine makes."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.all_special_ids: frozenset[int] = frozenset(hf_tokenizer.all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(
        self, token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> list[str]:
        return self.hf.convert_ids_to_tokens(
            list(token_ids), skip_special_tokens=skip_special_tokens
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.hf.convert_tokens_to_string(tokens)

    @property
    def chat_template(self) -> str:
        """The template's source ("" for none)."""
        return getattr(self.hf, "chat_template", None) or ""

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Render the conversation with the model's own template (or ``chat_template=``) and
        tokenize it. The template holds the special tokens (BOS, role markers);
        ``add_special_tokens`` adds the tokenizer's own on top (vLLM's flag, off by default)."""
        if not self.has_chat_template and kwargs.get("chat_template") is None:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return self.encode(text, add_special_tokens=add_special_tokens)
