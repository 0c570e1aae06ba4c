"""``ModelRunner``: turns a ``SchedulerOutput`` into model inputs, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infinite_llm.attention.dist import DistAttention, MAExecutor
from infinite_llm.attention.plan import DistPlan, StepSpan
from infinite_llm.engine.cpu_heap import keep_freed_memory
from infinite_llm.engine.sampler import SampledToken, make_generator, sample
from infinite_llm.engine.structured import StructuredOutputs
from infinite_llm.model.llama import LlamaForCausalLM
from infinite_llm.scheduler.output import SchedulerOutput
from infinite_llm.scheduler.request import Request


@dataclass
class PromptLogprobs:
    """Per request id, for each prompt token from the second on, in order: ``{token: logprob}``
    (the prompt's token and the top k) and the prompt token's rank in the whole vocabulary
    (1: the likeliest; vLLM counts the tokens at least as likely)."""

    entries: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)


PROMPT_LOGITS_ROWS = 256


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        executor: MAExecutor,
        seed: int = 0,
        structured: StructuredOutputs | None = None,
    ) -> None:
        self.model = model
        self.structured = structured  # None: no grammar-constrained requests on this runner
        self.block_size = block_size
        self.executor = executor
        self.device = model.device
        self.scale = model.arch.head_dim**-0.5
        self._seed_source = torch.Generator().manual_seed(seed)  # seeds requests that bring none
        if torch.device(self.device).type == "cpu":
            keep_freed_memory()  # a step's tensors reuse pages (cpu_heap)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, prompt_logprobs: PromptLogprobs | None = None
    ) -> dict[str, SampledToken]:
        """One forward pass over every scheduled chunk; returns the sampled token per request
        that samples. Requests that asked for ``prompt_logprobs`` get the ones this step's
        chunk computed added to ``prompt_logprobs`` (by request id), when it is given."""
        input_ids: list[int] = []
        positions: list[int] = []
        spans: list[StepSpan] = []
        sample_rows: list[int] = []
        samplers = []
        prompt_spans: list[tuple[Request, int, int, int]] = []  # request, row, position, rows
        for item in out.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            if prompt_logprobs is not None and request.sampling_params.prompt_logprobs is not None:
                # Row i predicts token i + 1: rows up to the prompt's last token but one, each
                # once (a recomputed request does not report them again).
                first = max(start, request.num_prompt_logprobs)
                last = min(end, request.num_prompt_tokens - 1)
                if last > first:
                    prompt_spans.append(
                        (request, len(input_ids) + first - start, first, last - first)
                    )
            input_ids.extend(request.token_ids(start, end))
            positions.extend(range(start, end))
            spans.append(StepSpan(request.block_table, start, item.num_new_tokens))
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
                samplers.append(request)
                if request.generator is None and not request.sampling_params.greedy:
                    seed = request.sampling_params.seed
                    if seed is None:
                        seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
                    request.generator = make_generator(seed)
        plan = DistPlan(spans, self.block_size, self.device)
        attention = DistAttention(self.executor, plan, self.scale)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, attention)
        if prompt_spans and prompt_logprobs is not None:
            self._prompt_logprobs(hidden, prompt_spans, prompt_logprobs)
        if not sample_rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        sampled = sample(logits.cpu(), samplers, self.structured)
        if self.structured is not None:
            self.structured.accept(samplers, [s.token_id for s in sampled])
        return {request.request_id: token for request, token in zip(samplers, sampled)}

    def _prompt_logprobs(
        self,
        hidden: torch.Tensor,
        spans: list[tuple[Request, int, int, int]],
        into: PromptLogprobs,
    ) -> None:
        """``{prompt token: logprob}`` plus the top k, for each row of each span, computed
        ``PROMPT_LOGITS_ROWS`` rows at a time (a chunk's full logits would not fit in memory)."""
        for request, first, position, count in spans:
            k = request.sampling_params.prompt_logprobs
            base = position + 1  # the token the span's first row predicts
            entries = into.entries.setdefault(request.request_id, [])
            ranks = into.ranks.setdefault(request.request_id, [])
            for lo in range(0, count, PROMPT_LOGITS_ROWS):
                hi = min(count, lo + PROMPT_LOGITS_ROWS)
                rows = hidden[first + lo : first + hi]
                logprobs = torch.log_softmax(self.model.compute_logits(rows).cpu(), dim=-1)
                targets = request.prompt_token_ids[base + lo : base + hi]
                picked = logprobs[torch.arange(hi - lo), torch.tensor(targets)]
                chosen = picked.tolist()
                ranks.extend((logprobs >= picked.unsqueeze(1)).sum(dim=1).tolist())
                if k:
                    width = logprobs.shape[1] if k == -1 else k
                    values, indices = torch.topk(logprobs, width, dim=-1)
                    tops = [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                else:
                    tops = [{} for _ in targets]
                for token, lp, top in zip(targets, chosen, tops):
                    top[token] = lp
                    entries.append(top)
            request.num_prompt_logprobs = position + count
