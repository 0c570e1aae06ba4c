"""Grammar-constrained sampling: one llguidance matcher per constrained request; before each
sample the token masks of every constrained row are filled at once and applied in one op.

Where it runs: in the ``ModelRunner`` of the instance that owns the request (in the driver's
process, or inside a Ray actor). A request's matcher rides on the request
(``Request.structured``, opaque to the scheduler) and always mirrors its output tokens: a
preempted request keeps its output and so its matcher; a request rebuilt elsewhere (a Ray
actor's copy, a request adopted after its home died) arrives without one and replays its
output tokens into a fresh one; an aborted or finished request takes its matcher with it.

Grammars are compiled once per distinct spec (an LRU of template matchers, copied per request
in about 1 us); compiling is cheap enough (0.4-0.8 ms for SmolLM2) to do inline at a request's
first sampled token. The tokenizer is loaded at the first constrained request (a Ray actor
never loads it otherwise).

Why llguidance rather than xgrammar (both maintained, both vLLM backends); measured here on the
2-core CPU machine with SmolLM2-135M's 49,152-token vocabulary (a 4-property schema with a
nested object, an array and a pattern; json_object = ``{"type": "object"}``; masks over the 47
tokens of a matching document):

==========================  ==============================  ==================================
                            llguidance 1.9.1                xgrammar 0.2.9
==========================  ==============================  ==================================
install                     3.1 MB wheel, 7.6 MB on disk,   1.3 MB wheel + apache-tvm-ffi
                            no dependencies                 (13 MB) + triton 3.9 (286 MB wheel,
                                                            1.04 GB on disk; GPU kernels only)
tokenizer setup, once       340-370 ms                      146-157 ms
compile schema / object     0.8 / 0.4 ms                    3.9-5.1 / 3.6-5.1 ms
mask per token, median      22-25 / 11-13 us                3-4 / 5-7 us
mask per token, max         1.6-2.1 / 0.1-0.2 ms            0.1 / 0.6 ms
==========================  ==============================  ==================================

Both cost far less than a decode step (23 ms at batch 1 on this CPU). llguidance wins on what
it pulls in: xgrammar requires triton on Linux x86-64 whatever the device, a gigabyte in a
CPU-pinned torch install; llguidance also validates a grammar without a tokenizer (so
``SamplingParams`` refuses a bad schema before a request is queued) and takes Lark, regex and
JSON schema natively.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import torch

from infinite_llm.scheduler.request import Request

logger = logging.getLogger(__name__)


class RequestGrammar:
    """A request's matcher and how many of its output tokens it has consumed.

    It never crosses a process: a pickled copy arrives empty and is rebuilt from the output
    tokens (llguidance matchers do not pickle)."""

    __slots__ = ("matcher", "num_consumed")

    def __init__(self, matcher: llguidance.LLMatcher | None = None) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (RequestGrammar, ())


class StructuredOutputs:
    """The grammar side of one runner (or of every runner of a process): compiler, LRU of
    compiled grammars, and the batched mask. ``load_tokenizer`` returns the model's Hugging Face
    fast tokenizer; ``vocab_size`` is the width of the logits."""

    def __init__(
        self, load_tokenizer: Callable[[], Any], vocab_size: int, cache_size: int = 64
    ) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._bits = torch.arange(32, dtype=torch.int32)
        self.num_words = -(-vocab_size // 32)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            import llguidance.hf  # imports transformers, which a Ray actor otherwise never loads

            hf = self._load_tokenizer()
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size)
            self._executor = llguidance.LLExecutor()
        return self._tokenizer

    def compile(self, grammar_spec: str) -> llguidance.LLMatcher:
        """A fresh matcher for ``grammar_spec`` (``StructuredOutputsParams.grammar_spec``),
        compiled once per distinct spec; raises ValueError if llguidance refuses it."""
        template = self._templates.get(grammar_spec)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar_spec, log_level=0)
            if template.is_error():
                raise ValueError(f"grammar: {template.get_error()}")
            self._templates[grammar_spec] = template
            if len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar_spec)
        return template.deep_copy()

    @property
    def num_cached(self) -> int:
        return len(self._templates)

    def matcher(self, request: Request) -> llguidance.LLMatcher:
        """The request's matcher, made at first use and caught up with its output tokens."""
        state = request.structured
        if state is None or state.matcher is None:
            spec = request.sampling_params.structured_outputs.grammar_spec  # type: ignore[union-attr]
            state = request.structured = RequestGrammar(self.compile(spec))
        if state.num_consumed < request.num_output_tokens:
            missing = request.output_token_ids[state.num_consumed :]
            if not state.matcher.consume_tokens(missing):
                logger.warning("%s: %s", request.request_id, state.matcher.get_error())
            state.num_consumed += len(missing)
        return state.matcher

    @staticmethod
    def rows(requests: Sequence[Request]) -> list[int]:
        """Indices of the grammar-constrained requests."""
        return [
            i for i, r in enumerate(requests) if r.sampling_params.structured_outputs is not None
        ]

    def apply_bitmask(
        self, logits: torch.Tensor, requests: Sequence[Request], rows: Sequence[int]
    ) -> None:
        """logits: [N, vocab] float32 on the CPU, row i for requests[i]; ``rows`` (``rows()``)
        get -inf on every token their grammar forbids next, in place, in one op."""
        if not rows:
            return
        matchers = [(self.matcher(requests[i]), k) for k, i in enumerate(rows)]
        assert self._executor is not None  # made with the tokenizer
        bitmask = torch.empty((len(rows), self.num_words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            matchers, bitmask.data_ptr(), self.num_words * 4, len(rows)
        )
        vocab = logits.shape[-1]
        # bit j of word w allows token 32 * w + j: [R, W] -> [R, W, 32] -> [R, vocab]
        allowed = ((bitmask.unsqueeze(-1) >> self._bits) & 1).view(len(rows), -1)[:, :vocab]
        forbidden = allowed == 0
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            index = torch.tensor(rows)
            logits.index_copy_(
                0, index, logits.index_select(0, index).masked_fill_(forbidden, float("-inf"))
            )

    def accept(self, requests: Sequence[Request], token_ids: Sequence[int]) -> None:
        """Advance the matcher of each constrained request with its sampled token."""
        for request, token_id in zip(requests, token_ids):
            state = request.structured
            if state is None or state.matcher is None:
                continue
            if not state.matcher.consume_token(token_id):
                logger.warning("%s: %s", request.request_id, state.matcher.get_error())
            state.num_consumed += 1
