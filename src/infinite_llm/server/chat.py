"""``POST /v1/chat/completions``: the model's chat template, then a completion, streamed or not.

Streaming follows OpenAI: a first chunk with the assistant role, content deltas, the finish
reason in the last choice chunk, then (with ``stream_options.include_usage``) one chunk with
no choices and the usage, then ``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from infinite_llm.outputs import CompletionOutput
from infinite_llm.server.async_engine import EngineDeadError
from infinite_llm.server.errors import APIError, bad_request, error_response
from infinite_llm.server.protocol import ChatCompletionRequest, check_model
from infinite_llm.server.serving import (
    STREAM_ERRORS,
    EngineStreamingResponse,
    ServerState,
    final_outputs,
    new_id,
    parse_body,
    sse,
    sse_error,
    start_requests,
    streamed,
    usage,
)
from infinite_llm.server.stream import RequestStream


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(body.model, state.served_model_names)
    params = body.sampling_params()
    messages = body.template_messages()
    tokenizer = state.engine.engine.tokenizer
    if not tokenizer.has_chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    try:
        prompt = await state.engine.run_in_tokenizer(
            lambda: tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt
            )
        )
    except EngineDeadError:
        raise
    except Exception as exc:  # a template may raise anything (jinja errors, its own checks)
        raise bad_request(f"messages: the chat template failed: {exc}", "messages") from exc
    response_id = new_id("chatcmpl")
    (stream,) = await start_requests(state, [prompt], params, response_id, "messages")
    meta = {"id": response_id, "created": int(time.time()), "model": model}
    top_k = (body.top_logprobs or 0) if body.logprobs else None
    if body.wants_stream:
        return EngineStreamingResponse(_events(state, body, stream, meta, top_k), [stream])
    try:
        outputs = await final_outputs(request, [stream])
    except STREAM_ERRORS as exc:
        raise APIError(500, str(exc)) from exc
    if outputs is None:
        return error_response(499, "client disconnected", err_type="ClientClosedRequest")
    (output,) = outputs
    choices = [
        {
            "index": completion.index,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": _logprobs(state, completion, completion.token_ids, top_k),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        }
        for completion in output.outputs
    ]
    num_completion = sum(len(c.token_ids) for c in output.outputs)
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(len(output.prompt_token_ids), num_completion),
        }
    )


def _logprobs(
    state: ServerState, completion: CompletionOutput, token_ids: list[int], top_k: int | None
) -> Any:
    if top_k is None or completion.logprobs is None:
        return None
    start = len(completion.token_ids) - len(token_ids)
    return state.formatter.chat(token_ids, completion.logprobs[start:], top_k)


async def _events(
    state: ServerState,
    body: ChatCompletionRequest,
    stream: RequestStream,
    meta: dict[str, Any],
    top_k: int | None,
) -> AsyncIterator[str]:
    meta = {**meta, "object": "chat.completion.chunk"}
    num_prompt = stream.num_prompt_tokens
    num_completion = [0] * (body.n or 1)  # per choice

    def chunk(
        delta: dict[str, Any],
        logprobs: Any = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        index: int = 0,
    ) -> str:
        data: dict[str, Any] = {
            **meta,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                }
            ],
        }
        if body.include_usage:
            data["usage"] = (
                usage(num_prompt, num_completion[index]) if body.continuous_usage else None
            )
        return sse(data)

    try:
        for index in range(len(num_completion)):
            yield chunk({"role": "assistant", "content": ""}, index=index)
        async for output in stream:
            if not streamed(output):
                continue
            completion = output.outputs[0]
            index = completion.index
            num_completion[index] = len(completion.token_ids)
            new_tokens = output.delta_token_ids
            done = completion.finished()
            if not output.delta_text and not done and not (top_k is not None and new_tokens):
                continue
            logprobs = _logprobs(state, completion, new_tokens, top_k)
            delta = {"content": output.delta_text} if output.delta_text or not done else {}
            if done:
                yield chunk(
                    delta, logprobs, completion.finish_reason, completion.stop_reason, index
                )
            else:
                yield chunk(delta, logprobs, index=index)
        if body.include_usage:
            yield sse({**meta, "choices": [], "usage": usage(num_prompt, sum(num_completion))})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
