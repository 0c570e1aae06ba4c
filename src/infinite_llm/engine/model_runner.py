"""``ModelRunner``: turns a ``SchedulerOutput`` into model inputs, runs the model, samples."""

from __future__ import annotations

import torch

from infinite_llm.attention.dist import DistAttention, DistPlan, MAExecutor, StepSpan
from infinite_llm.engine.sampler import SampledToken, make_generator, sample
from infinite_llm.engine.structured import StructuredOutputs
from infinite_llm.model.llama import LlamaForCausalLM
from infinite_llm.scheduler.output import SchedulerOutput


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

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        """One forward pass over every scheduled chunk; returns the sampled token per request that samples."""
        input_ids: list[int] = []
        positions: list[int] = []
        spans: list[StepSpan] = []
        sample_rows: list[int] = []
        samplers = []
        for item in out.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(request.token_ids(start, end))
            positions.extend(range(start, end))
            spans.append(StepSpan(request.block_table.refs(), start, item.num_new_tokens))
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
        if not sample_rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        sampled = sample(logits.cpu(), samplers, self.structured)
        if self.structured is not None:
            self.structured.accept(samplers, [s.token_id for s in sampled])
        return {request.request_id: token for request, token in zip(samplers, sampled)}
