"""What the completion and chat endpoints share: body parsing, admission, SSE, disconnects.

A request is tokenized and validated before anything is queued (bad input answers 4xx and
never reaches the engine). Whatever way a response ends (finished, client gone, error), its
requests are aborted if still running, which frees their rBlocks on every instance.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from infinite_llm.outputs import RequestOutput
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.server.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
)
from infinite_llm.server.errors import APIError, bad_request, error_body, validation_error
from infinite_llm.server.logprobs import LogprobFormatter
from infinite_llm.server.metrics import ServerMetrics
from infinite_llm.server.stream import RequestStream

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    """Everything a handler needs, built once per app."""

    engine: AsyncLLMEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    formatter: LogprobFormatter
    model_source: str = ""
    trust_request_chat_template: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def new_id(prefix: str, request_id: str | None = None) -> str:
    """``prefix-<request_id>`` (the client's, as vLLM names it), or a fresh one."""
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``; 400 naming the problem otherwise."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty (send a JSON object)")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


async def start_requests(
    state: ServerState,
    prompts: Sequence[str | list[int]],
    params: SamplingParams,
    request_id: str,
    param: str,
    add_special_tokens: bool = True,
) -> list[RequestStream]:
    """Tokenize and validate every prompt, then queue them all (or none)."""
    engine = state.engine
    try:
        engine.engine.check_params(params)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0].rstrip(":")
        if param == "messages" and field == "logprobs":  # chat asks for them as top_logprobs
            raise bad_request(f"top_{exc}", "top_logprobs") from exc
        raise bad_request(str(exc), field) from exc
    requests = []
    for i, prompt in enumerate(prompts):
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        try:
            request = await engine.make_request(prompt, params, rid, add_special_tokens)
        except ValueError as exc:
            where = param if len(prompts) == 1 else f"{param}[{i}]"
            message = (
                str(exc)
                if len(prompts) == 1 and str(exc).startswith("prompt")
                else f"{where}: {exc}"
            )
            raise bad_request(message, param) from exc
        check_context_length(
            request.num_prompt_tokens, params.max_tokens, engine.max_model_len, param
        )
        requests.append((request, prompt if isinstance(prompt, str) else None))
    streams: list[RequestStream] = []
    try:
        for request, text in requests:
            streams.append(engine.generate(request, text))
    except (EngineOverloadedError, EngineDeadError) as exc:
        for stream in streams:
            stream.abort()
        raise APIError(503, str(exc)) from exc
    return streams


def check_context_length(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str
) -> None:
    """vLLM's rule: an explicit ``max_tokens`` must fit beside the prompt in ``max_model_len``."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        where = "messages" if param == "messages" else "prompt"
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {where}, {max_tokens} in "
            f"the completion). Please reduce the length of the {where} or completion.",
            param,
        )


def usage(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int
) -> dict[str, Any]:
    """OpenAI's usage object. ``prompt_tokens_details.cached_tokens``: the prompt tokens found
    in the prefix cache (``RequestOutput.num_cached_tokens``, 0 when none were or the cache is
    off). It is always there, as OpenAI always sends it: clients read it without asking, and 0
    says "nothing cached" where a missing field says nothing (vLLM sends it only when started
    with ``--enable-prompt-tokens-details``; here it costs a few bytes per response)."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error inside an SSE stream (headers already sent): vLLM sends the error object."""
    status = 503 if isinstance(exc, EngineDeadError) else 500
    return sse(error_body(status, str(exc)))


STREAM_ERRORS = (EngineStepError, EngineDeadError)


def streamed(output: RequestOutput) -> bool:
    """Whether a stream shows ``output``: every output but the last of a request of several
    samples, which gathers what each sample's own outputs already streamed
    (``engine.parallel_sampling``)."""
    return not (output.finished and len(output.outputs) > 1)


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def final_outputs(
    request: Request, streams: Sequence[RequestStream]
) -> list[RequestOutput] | None:
    """Every stream's last output; ``None`` when the client went away first (all aborted)."""

    async def collect() -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for index, output in merged(streams):
            last[index] = output
        return [last[i] for i in range(len(streams))]

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return None
    finally:
        for task in (work, gone):
            task.cancel()
        for stream in streams:
            stream.abort()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EngineStreamingResponse(StreamingResponse):
    """SSE that aborts its requests however the response ends (Starlette cancels the body
    iterator when the client disconnects; this also covers a body never started)."""

    def __init__(self, content: AsyncIterator[str], streams: Sequence[RequestStream]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.streams = list(streams)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.abort()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
