"""``LLM``: the offline Python API, in vLLM's shape.

from infinite_llm import LLM, SamplingParams
llm = LLM(model="smollm2")
out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
print(out[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from infinite_llm import chat_tools
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.model.loader import LoadedModel
from infinite_llm.outputs import RequestOutput
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request
from infinite_llm.scheduler.scheduler import SchedulerConfig

# A prompt: text, token ids, or vLLM's ``TextPrompt`` / ``TokensPrompt`` dicts
# ({"prompt": text} / {"prompt_token_ids": [ids]}).
Prompt = str | Sequence[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str = "smollm2",
        *,
        num_instances: int = 1,
        num_memory_instances: int = 0,
        kv_memory_per_memory_instance: int | None = None,
        host_kv_memory: int | None = None,
        block_size: int = 16,
        kv_blocks_per_instance: int | None = None,
        kv_memory_per_instance: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        backend: str = "inprocess",
        ray_address: str | None = None,
        enable_borrowing: bool = True,
        lending_cap: float = 1.0,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        attention_impl: str = "auto",
        max_logprobs: int = 20,
        loaded_model: LoadedModel | None = None,
        progress: bool = True,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            num_instances=num_instances,
            backend=backend,
            ray_address=ray_address,
            max_model_len=max_model_len,
            seed=seed,
            attention_impl=attention_impl,
            max_logprobs=max_logprobs,
            num_memory_instances=num_memory_instances,
            kv_memory_per_memory_instance=kv_memory_per_memory_instance,
            host_kv_memory=host_kv_memory,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=kv_blocks_per_instance,
                memory_bytes=kv_memory_per_instance,
                lending_cap=lending_cap,
                enable_borrowing=enable_borrowing,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
            ),
        )
        self.engine = LLMEngine(config, loaded_model, progress=progress)

    @classmethod
    def from_config(
        cls, config: EngineConfig, loaded_model: LoadedModel | None = None, progress: bool = True
    ) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, loaded_model, progress=progress)
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or a ``TextPrompt``/``TokensPrompt``
        dict); outputs in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = [_prompt_of(p, i) for i, p in enumerate(prompts)]  # type: ignore[arg-type]
        params = self._params_list(sampling_params, len(prompt_list))
        # Validate everything before adding anything: a bad prompt leaves nothing behind.
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompt_list, params)]
        texts = [p if isinstance(p, str) else None for p in prompt_list]
        return self._run(requests, texts, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (or ``chat_template``) to one conversation or a list
        of them, then generate. ``continue_final_message``: the last (assistant) message stays
        open and the answer continues it (not with ``add_generation_prompt``);
        ``chat_template_kwargs`` reach the template as variables; ``tools`` (OpenAI function
        schemas) are rendered for the model, by its template where it knows tools, else in
        the Hermes style, as the server does (``chat_tools``); the answer is text, as vLLM's
        ``LLM.chat`` returns it (vLLM's arguments)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message cannot be used with add_generation_prompt "
                "(pass add_generation_prompt=False)"
            )
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        tokenizer = self.engine.tokenizer
        template = chat_template or tokenizer.chat_template
        prompts = []
        for conv in conversations:
            rendered, tool_kwargs = chat_tools.template_inputs(list(conv), tools, template)  # type: ignore[arg-type]
            prompts.append(
                tokenizer.apply_chat_template(
                    rendered, add_generation_prompt=add_generation_prompt, **kwargs, **tool_kwargs
                )
            )
        return self.generate(prompts, sampling_params, use_tqdm)

    def cluster_stats(self) -> dict[str, object]:
        return self.engine.cluster.stats()

    def check_integrity(self) -> None:
        self.engine.check_integrity()

    def shutdown(self) -> None:
        """Stop the cluster's processes (Ray actors); the in-process cluster needs nothing."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _params_list(
        sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def _run(
        self, requests: list[Request], texts: list[str | None], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        added: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for request, text in zip(requests, texts):
                engine.add_request(request, text)
                added.append(request.request_id)
            with tqdm(
                total=len(requests), desc="generating", unit="req", disable=not use_tqdm
            ) as bar:
                while len(finished) < len(requests):
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
        finally:
            for request_id in added:  # interrupted (KeyboardInterrupt, error): free everything
                if request_id not in finished:
                    engine.abort_request(request_id)
        return [finished[r.request_id] for r in requests]


def _prompt_of(prompt: Prompt, index: int) -> str | list[int]:
    """Text or token ids from any prompt form ``generate`` takes; ``ValueError`` naming the
    prompt otherwise."""
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt_token_ids"}:
            prompt = prompt["prompt_token_ids"]
        elif keys == {"prompt"}:
            prompt = prompt["prompt"]
        else:
            raise ValueError(
                f"prompts[{index}]: a prompt dict holds exactly one of 'prompt' (text) or "
                f"'prompt_token_ids', got keys {sorted(keys)}"
            )
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return list(prompt)
    raise ValueError(
        f"prompts[{index}] must be text, a list of token ids or a prompt dict, "
        f"got {type(prompt).__name__}"
    )
