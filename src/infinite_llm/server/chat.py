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

from infinite_llm.outputs import RequestOutput
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
    usage,
)
from infinite_llm.server.stream import RequestStream
from infinite_llm.server.tools import (
    ToolSetup,
    assistant_message,
    template_inputs,
    tool_finish_reason,
)


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(body.model, state.served_model_names)
    params = body.sampling_params()
    tools = body.tool_setup()
    tokenizer = state.engine.engine.tokenizer
    if not tokenizer.has_chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages, template_kwargs = template_inputs(
        body.template_messages(), tools, tokenizer.chat_template
    )
    try:
        prompt = await state.engine.run_in_tokenizer(
            lambda: tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, **template_kwargs
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
        return EngineStreamingResponse(_events(state, body, stream, meta, top_k, tools), [stream])
    try:
        outputs = await final_outputs(request, [stream])
    except STREAM_ERRORS as exc:
        raise APIError(500, str(exc)) from exc
    if outputs is None:
        return error_response(499, "client disconnected", err_type="ClientClosedRequest")
    (output,) = outputs
    completion = output.outputs[0]
    message, finish_reason = assistant_message(tools, completion.text, completion.finish_reason)
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(state, output, completion.token_ids, top_k),
        "finish_reason": finish_reason,
        "stop_reason": completion.stop_reason,
    }
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion",
            "choices": [choice],
            "usage": usage(len(output.prompt_token_ids), len(completion.token_ids)),
        }
    )


def _logprobs(
    state: ServerState, output: RequestOutput, token_ids: list[int], top_k: int | None
) -> Any:
    completion = output.outputs[0]
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
    tools: ToolSetup | None = None,
) -> AsyncIterator[str]:
    meta = {**meta, "object": "chat.completion.chunk"}
    num_prompt = stream.num_prompt_tokens
    num_completion = 0

    def chunk(
        delta: dict[str, Any],
        logprobs: Any = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
    ) -> str:
        data: dict[str, Any] = {
            **meta,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                }
            ],
        }
        if body.include_usage:
            data["usage"] = usage(num_prompt, num_completion) if body.continuous_usage else None
        return sse(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        parser = tools.parser() if tools is not None else None
        called = False
        async for output in stream:
            completion = output.outputs[0]
            num_completion = len(completion.token_ids)
            new_tokens = output.delta_token_ids
            if parser is not None:  # tool calls: the parser's deltas, the last one finishing
                deltas = parser.feed(output.delta_text)
                deltas += parser.finish() if output.finished else []
                called = called or any("tool_calls" in d for d in deltas)
                logprobs = _logprobs(state, output, new_tokens, top_k)
                last = deltas.pop() if output.finished and deltas else None
                for delta in deltas:
                    yield chunk(delta, logprobs)
                    logprobs = None
                if output.finished:
                    reason = tool_finish_reason(completion.finish_reason, called)
                    yield chunk(last or {}, logprobs, reason, completion.stop_reason)
                continue
            if (
                not output.delta_text
                and not output.finished
                and not (top_k is not None and new_tokens)
            ):
                continue
            logprobs = _logprobs(state, output, new_tokens, top_k)
            delta = (
                {"content": output.delta_text} if output.delta_text or not output.finished else {}
            )
            if output.finished:
                yield chunk(delta, logprobs, completion.finish_reason, completion.stop_reason)
            else:
                yield chunk(delta, logprobs)
        if body.include_usage:
            yield sse({**meta, "choices": [], "usage": usage(num_prompt, num_completion)})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
