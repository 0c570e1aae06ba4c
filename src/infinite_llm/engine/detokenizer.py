"""Incremental detokenization that never splits a multi-byte character, plus stop strings.

Built on the ``tokenizers`` library's ``DecodeStream``, primed with the end of the prompt so
word boundaries decode as they would inside the full text.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from infinite_llm.sampling_params import SamplingParams

_PROMPT_CONTEXT = 4  # prompt tokens fed to the stream first, for leading-space handling


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._backend = tokenizer.hf.backend_tokenizer
        context = prompt_token_ids[-_PROMPT_CONTEXT:]
        self._stream = DecodeStream(context, skip_special_tokens=params.skip_special_tokens)
        self._skip_special = params.skip_special_tokens
        self._stop = params.stop_strings
        self._include_stop = params.include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self.stop_string: str | None = None

    def add_token(self, token_id: int) -> None:
        """Append a token's text; after a stop string matches, ``stop_string`` is set and text cut."""
        chunk = self._stream.step(self._backend, token_id)
        if not chunk or self.stop_string is not None:
            return
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += chunk
        for stop in self._stop:
            at = self.text.find(stop, start)
            if at != -1:
                self.stop_string = stop
                self.text = self.text[: at + len(stop)] if self._include_stop else self.text[:at]
                return

    def flush(self, output_token_ids: list[int]) -> None:
        """At the end: emit bytes the stream still holds (an unfinished UTF-8 sequence decodes to U+FFFD)."""
        if self.stop_string is not None:
            return
        full = self._backend.decode(output_token_ids, skip_special_tokens=self._skip_special)
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full

    def stable_length(self, finished: bool) -> int:
        """Characters safe to stream: hold back what could still become the start of a stop string."""
        if finished or not self._stop:
            return len(self.text)
        return max(0, len(self.text) - self._max_stop + 1)
