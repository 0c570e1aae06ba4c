"""The OpenAI request bodies we accept (vLLM's field names and extras), as pydantic models.

Unknown fields are ignored, as vLLM does; fields we know but cannot honour (penalties,
``echo``, tools, images, ``best_of`` on chat or with ``stream``) are refused with a 400 naming them rather than silently
changing the answer. ``to_sampling_params`` turns a body into ``SamplingParams``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from infinite_llm.sampling_params import SamplingParams
from infinite_llm.server.errors import APIError, bad_request

TokenIds = list[int]


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class _GenerationRequest(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")
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
    # Known but not supported: refused unless left at their neutral value.
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    use_beam_search: bool = False

    def check_supported(self) -> None:
        if self.best_of not in (None, 1) and not self.supports_best_of:
            raise bad_request("best_of is only supported by /v1/completions", "best_of")
        if self.best_of not in (None, 1) and self.stream:
            raise bad_request("best_of is not supported when streaming", "best_of")
        if self.use_beam_search:
            raise bad_request("beam search is not supported", "use_beam_search")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported (leave it at 0)", name)
        if self.repetition_penalty not in (None, 1, 1.0):
            raise bad_request(
                "repetition_penalty is not supported (leave it at 1)", "repetition_penalty"
            )
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    @property
    def wants_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            message = str(exc)
            first = message.split(" ", 1)[0]
            param = first if first in kwargs or first == "n" else None
            if param == "max_tokens" and "max_completion_tokens" in self.model_fields_set:
                param = "max_completion_tokens"
            raise bad_request(message, param) from exc


class CompletionRequest(_GenerationRequest):
    supports_best_of: ClassVar[bool] = True
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

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

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        max_tokens = (
            16 if self.max_tokens is None else self.max_tokens
        )  # OpenAI's and vLLM's default
        return self.to_sampling_params(max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

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
        return message


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message(i) for i, m in enumerate(self.messages)]

    def sampling_params(self) -> SamplingParams:
        if self.tools:
            raise bad_request("tools are not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is not supported", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request("response_format other than text is not supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if (
            self.top_logprobs is not None
            and not 0 <= self.top_logprobs <= SamplingParams.MAX_LOGPROBS
        ):
            raise bad_request(
                f"top_logprobs must be between 0 and {SamplingParams.MAX_LOGPROBS}, "
                f"got {self.top_logprobs}",
                "top_logprobs",
            )
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.to_sampling_params(max_tokens, logprobs)  # None: up to max_model_len


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
