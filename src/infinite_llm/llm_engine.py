"""``LLMEngine``: the front end of the cluster: tokenize and validate, step, detokenize.

Used by ``LLM`` (offline) and by the server (online). Requests are refused with a
``ValueError`` naming the problem before any memory is taken. A request of several samples
(``n`` or ``best_of`` > 1) fans out here into one request per sample, all on one home instance
(``engine.parallel_sampling``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence

from infinite_llm.cluster import create_cluster
from infinite_llm.config import EngineConfig
from infinite_llm.engine.output_processor import OutputProcessor
from infinite_llm.engine.parallel_sampling import ParentRequest
from infinite_llm.model.loader import LoadedModel, load_model
from infinite_llm.outputs import RequestOutput
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, progress: bool = True
    ) -> None:
        self.config = config
        self.loaded = loaded or load_model(
            config.model, config.dtype, config.device, progress=progress
        )
        self.tokenizer = self.loaded.tokenizer
        self.arch = self.loaded.arch
        self.cluster = create_cluster(config, self.loaded)
        self.max_model_len = self._resolve_max_model_len()
        self.output_processor = OutputProcessor(self.tokenizer)
        self.parents: dict[str, ParentRequest] = {}  # requests of several samples, by id
        self._parent_of: dict[str, ParentRequest] = {}  # by the id of each of their samples
        self._ids = itertools.count()

    def _resolve_max_model_len(self) -> int:
        capacity = self.cluster.max_request_tokens
        wanted = self.config.max_model_len or self.arch.max_position_embeddings
        if (
            self.config.max_model_len
            and self.config.max_model_len > self.arch.max_position_embeddings
        ):
            logger.warning(
                "max_model_len %d is past the %d positions %s was trained on",
                self.config.max_model_len,
                self.arch.max_position_embeddings,
                self.loaded.source.name,
            )
        if wanted > capacity:
            if self.config.max_model_len:
                logger.warning(
                    "max_model_len %d exceeds the KV capacity of %d tokens; using %d",
                    wanted,
                    capacity,
                    capacity,
                )
            return capacity
        return wanted

    # -- requests ---------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> Request:
        """Tokenize and validate; raises ValueError naming the problem (nothing is allocated).
        ``add_special_tokens``: whether encoding a text prompt adds the tokenizer's own (BOS)."""
        self.check_params(params)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids out of range [0, {self.arch.vocab_size}): {bad[:5]}"
            )
        token_ids = self._truncate(token_ids, params)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, but this engine's max_model_len is {self.max_model_len} "
                f"(the prompt plus at least one generated token must fit)"
            )
        if params.max_tokens is None:
            max_tokens = self.max_model_len - len(token_ids)
        else:
            max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        return Request(
            request_id=request_id or self.new_request_id(),
            prompt_token_ids=token_ids,
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    def check_params(self, params: SamplingParams) -> None:
        """What only the engine can check: token ids inside the vocabulary, logprobs within
        ``max_logprobs``, truncation within ``max_model_len``."""
        vocab = self.arch.vocab_size
        for name, ids in params.token_ids_used().items():
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                )
        cap = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(params, name)
            if wanted is not None and (vocab if wanted == -1 else wanted) > cap:
                raise ValueError(
                    f"{name}: requested {vocab if wanted == -1 else wanted} logprobs per token, "
                    f"more than this engine's max_logprobs ({cap}; raise it with --max-logprobs)"
                )
        truncate = params.truncate_prompt_tokens
        if truncate is not None and truncate > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens ({truncate}) is greater than max_model_len "
                f"({self.max_model_len})"
            )

    def _truncate(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        keep = params.truncate_prompt_tokens
        if keep is None:
            return token_ids
        if keep == -1:
            keep = self.max_model_len - 1  # room for one generated token
        if keep == 0:
            raise ValueError("truncate_prompt_tokens=0 leaves an empty prompt")
        if len(token_ids) <= keep:
            return token_ids
        return token_ids[-keep:] if params.truncation_side == "left" else token_ids[:keep]

    def add_request(
        self, request: Request, prompt_text: str | None = None, home: int | None = None
    ) -> None:
        """Queue a request made by ``make_request`` (its id must be new); ``home`` pins its
        instance. A request of several samples is queued as one request per sample, every one on
        the home the first is routed to."""
        rid = request.request_id
        if rid in self.output_processor.requests or rid in self.parents:
            raise ValueError(f"request id {rid!r} is already in use")
        need, capacity = request.num_tokens + request.max_tokens, self.cluster.max_request_tokens
        if need > capacity:  # within max_model_len: the cluster lost an instance since
            raise ValueError(
                f"this request may need {need} tokens of KV, but the cluster's live instances "
                f"hold at most {capacity} now"
            )
        if request.sampling_params.num_samples == 1:
            self._add(request, prompt_text, home)
            return
        parent = ParentRequest(request)
        self.parents[rid] = parent
        for child in parent.children:
            self._parent_of[child.request_id] = parent
            home = self._add(child, prompt_text, home)

    def _add(self, request: Request, prompt_text: str | None, home: int | None) -> int:
        self.output_processor.add_request(
            request.request_id, prompt_text, list(request.prompt_token_ids), request.sampling_params
        )
        return self.cluster.add_request(request, home)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request (every sample of it) wherever it runs and free its rBlocks; its final
        output, or None if unknown."""
        parent = self.parents.get(request_id)
        if parent is None:
            output = self.output_processor.abort(request_id)
            if output is not None:
                self.cluster.abort_request(request_id)
            return output
        final = None
        for child_id in parent.unfinished_child_ids():
            output = self.output_processor.abort(child_id)
            if output is not None:
                self.cluster.abort_request(child_id)
                final = self._gather(output)[-1]
        return final

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    @property
    def num_unfinished_requests(self) -> int:
        """Unfinished requests, a request of several samples counted once."""
        samples = len(self.output_processor.requests)
        return samples - sum(len(p.unfinished_child_ids()) - 1 for p in self.parents.values())

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step on every instance; outputs for the requests that made progress."""
        return [output for part in self.step_in_parts() for output in part]

    def step_in_parts(self) -> Iterator[list[RequestOutput]]:
        """``step()`` as its outputs come: one part per instance where instances step in turn
        (``Cluster.step_in_parts``), so a server sends an instance's tokens before the next
        instance's step ends. Run it to its end."""
        for events in self.cluster.step_in_parts():
            outputs: list[RequestOutput] = []
            for event in events:
                output, stopped = self.output_processor.process(event)
                if stopped:
                    self.cluster.finish_request(event.request_id, RequestStatus.FINISHED_STOPPED)
                if output is not None:
                    outputs.extend(self._gather(output))
            yield outputs

    def _gather(self, output: RequestOutput) -> list[RequestOutput]:
        """A sample's output as its parent emits it (itself when it has no parent)."""
        parent = self._parent_of.get(output.request_id)
        if parent is None:
            return [output]
        if output.finished:
            del self._parent_of[output.request_id]
        emitted = parent.add(output)
        if emitted and emitted[-1].finished:
            del self.parents[parent.request_id]
        return emitted

    def check_integrity(self) -> None:
        self.cluster.check_integrity()

    def shutdown(self) -> None:
        self.cluster.shutdown()
