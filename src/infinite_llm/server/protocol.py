"""The OpenAI request bodies we accept (vLLM's field names and extras), as pydantic models.

Fields neither OpenAI nor vLLM define are ignored with a warning in the log, as vLLM does.
Fields vLLM defines that this server cannot honour (``REFUSED``: beam search, bad words,
multimodal and disaggregation parameters, ...) get a 400 naming them unless left at their
neutral value: a client never gets an answer that silently ignored what it asked for.
``to_sampling_params`` turns a body into ``SamplingParams``; the fields that constrain the
output are gathered by ``structured.py``, tools by ``tools.py``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infinite_llm.sampling_params import SamplingParams
from infinite_llm.server.errors import APIError, bad_request
from infinite_llm.server.structured import (
    JsonSchemaFormat,
    StructuredOutputsBody,
    guided_sources,
    response_format_source,
    structured_outputs_from,
)
from infinite_llm.server.tools import ChatTool, ToolChoice, ToolSetup, tool_setup
from infinite_llm.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)

TokenIds = list[int]

# vLLM request fields this server does not implement, with the values that ask for nothing.
REFUSED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "early_stopping": (False,),
    "watermarking": (False,),
    "bad_words": ([],),
    "logprob_token_ids": (),
    "spaces_between_special_tokens": (True,),
    "priority": (0,),
    "session_id": (),
    "stream_interval": (1,),
    "suffix": ("",),
    "prompt_embeds": (),
    "include_reasoning": (True,),
    "reasoning_effort": (),
    "thinking_token_budget": (),
    "return_token_offsets": (False,),
    "return_prompt_text": (False,),
    "routed_experts_prompt_start": (0,),
    "repetition_detection": (),
    "kv_transfer_params": (),
    "ec_transfer_params": (),
    "vllm_xargs": (),
    "mm_processor_kwargs": (),
    "media_io_kwargs": (),
    "mm_payload": (),
    "return_mm_kwargs": (False,),
}


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _GenerationRequest(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="allow")
    supports_best_of: ClassVar[bool] = False  # only /v1/completions has it (vLLM)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    # Output constraints (structured.py): vLLM's object and its older guided_* fields.
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    echo: bool = False
    request_id: str | None = None
    # Isolates prefix-cache hits between tenants: this server shares no KV between requests,
    # so every salt is already isolated.
    cache_salt: str | None = None
    response_format: ResponseFormat | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _GenerationRequest:
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in REFUSED and value is not None and value not in REFUSED[name]:
                raise bad_request(f"`{name}` is not supported by this server", name)
        unknown = sorted(set(extra) - set(REFUSED))
        if unknown:
            logger.warning("ignoring request fields this server does not know: %s", unknown)
        return self

    def check_supported(self) -> None:
        if self.best_of not in (None, 1) and not self.supports_best_of:
            raise bad_request("best_of is only supported by /v1/completions", "best_of")
        if self.best_of not in (None, 1) and self.stream:
            raise bad_request("best_of is not supported when streaming", "best_of")
        if self.prompt_logprobs is not None and self.stream and self.prompt_logprobs != 0:
            raise bad_request(
                "prompt_logprobs are not available when stream is true", "prompt_logprobs"
            )

    def constraint_sources(self) -> dict[str, dict[str, Any]]:
        return {**guided_sources(self), **response_format_source(self.response_format)}

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        return structured_outputs_from(self.constraint_sources())

    @property
    def wants_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def to_sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """``SamplingParams`` from the body (OpenAI defaults for what is left out)."""
        self.check_supported()
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        kwargs: dict[str, Any] = {
            "n": 1 if self.n is None else self.n,
            "best_of": self.best_of,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0 if self.top_k is None else self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "seed": self.seed,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0
            if self.repetition_penalty is None
            else self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "allowed_token_ids": self.allowed_token_ids,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "truncation_side": self.truncation_side or "left",
            "structured_outputs": self.structured_outputs_params(),
        }
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            message = str(exc)
            first = message.split(" ", 1)[0].rstrip(":")
            param = first if first in kwargs or first == "n" else None
            if param == "max_tokens" and "max_completion_tokens" in self.model_fields_set:
                param = "max_completion_tokens"
            raise bad_request(message, param) from exc


class CompletionRequest(_GenerationRequest):
    supports_best_of: ClassVar[bool] = True
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = None
    add_special_tokens: bool = True

    def prompts(self) -> list[str | TokenIds]:
        """The prompts of the body: a string, token ids, or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def prompt_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: score the prompt, generate nothing."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default
        prompt_logprobs = self.prompt_logprobs
        if self.echo and prompt_logprobs is None:
            prompt_logprobs = self.logprobs  # the echoed prompt's tokens carry logprobs too
        if self.prompt_only:
            max_tokens = 1  # one step computes the prompt; its token is not returned
        return self.to_sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's past calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def as_template_message(self, index: int) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{index}].content: only text parts are supported (got type {part.type!r})",
                        "messages",
                    )
                texts.append(part.text)
            content = "".join(texts)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template holds the special tokens
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message(i) for i, m in enumerate(self.messages)]

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the chat template; 400 for a clash or a bad combination."""
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message cannot be used with add_generation_prompt "
                "(send add_generation_prompt: false)",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message needs the last message to be the assistant's",
                "continue_final_message",
            )
        kwargs: dict[str, Any] = dict(self.chat_template_kwargs or {})
        reserved = {
            "tokenize",
            "conversation",
            "messages",
            "add_generation_prompt",
            "continue_final_message",
            "chat_template",
            "documents",
            "tools",
        }
        clash = sorted(reserved & set(kwargs))
        if clash:
            raise bad_request(
                f"chat_template_kwargs may not set {', '.join(clash)} (use the request fields)",
                "chat_template_kwargs",
            )
        kwargs["add_generation_prompt"] = self.add_generation_prompt
        if self.continue_final_message:
            kwargs["continue_final_message"] = True
        if self.documents is not None:
            kwargs["documents"] = self.documents
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return kwargs

    @property
    def echoed_text(self) -> str:
        """With ``echo``: the last message's text when it is the assistant's (the reply
        continues it), else nothing."""
        if not self.echo or self.messages[-1].role != "assistant":
            return ""
        return str(self.messages[-1].as_template_message(len(self.messages) - 1)["content"])

    def tool_setup(self) -> ToolSetup | None:
        return tool_setup(self.tools, self.tool_choice)

    def constraint_sources(self) -> dict[str, dict[str, Any]]:
        setup = self.tool_setup()
        return {
            **super().constraint_sources(),
            **(setup.structured_source() if setup else {}),
        }

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs < -1:
            raise bad_request(
                f"top_logprobs must be non-negative or -1, got {self.top_logprobs}", "top_logprobs"
            )
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # None: up to max_model_len
        return self.to_sampling_params(max_tokens, logprobs, self.prompt_logprobs)


def check_model(requested: str | None, served: list[str]) -> str:
    """The name to answer with; 404 for a model this server does not serve."""
    if requested is None or requested == "":
        return served[0]
    if requested not in served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist (this server serves "
            f"{', '.join(repr(s) for s in served)}).",
            "model",
        )
    return requested
