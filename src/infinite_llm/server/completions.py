"""``POST /v1/completions``: text completions, streamed by SSE or in one JSON answer.

A prompt is a string, token ids, or a list of either (``n`` choices per prompt, as vLLM
does: choice ``prompt_index * n + sample_index``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from infinite_llm.outputs import CompletionOutput
from infinite_llm.server.errors import APIError, error_response
from infinite_llm.server.protocol import CompletionRequest, check_model
from infinite_llm.server.serving import (
    STREAM_ERRORS,
    EngineStreamingResponse,
    ServerState,
    final_outputs,
    merged,
    new_id,
    parse_body,
    sse,
    sse_error,
    start_requests,
    streamed,
    usage,
)
from infinite_llm.server.stream import RequestStream


async def create_completion(request: Request, state: ServerState) -> Response:
    body = await parse_body(request, CompletionRequest)
    model = check_model(body.model, state.served_model_names)
    params = body.sampling_params()
    prompts = body.prompts()
    response_id = new_id("cmpl")
    streams = await start_requests(state, prompts, params, response_id, "prompt")
    meta = {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if body.wants_stream:
        return EngineStreamingResponse(_events(state, body, streams, meta), streams)
    try:
        outputs = await final_outputs(request, streams)
    except STREAM_ERRORS as exc:
        raise APIError(500, str(exc)) from exc
    if outputs is None:
        return error_response(499, "client disconnected", err_type="ClientClosedRequest")
    want_logprobs, n = body.logprobs is not None, params.n
    choices = [
        _choice(state, i * n + c.index, c, want_logprobs)
        for i, out in enumerate(outputs)
        for c in out.outputs
    ]
    num_prompt = sum(len(out.prompt_token_ids) for out in outputs)
    num_completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return JSONResponse({**meta, "choices": choices, "usage": usage(num_prompt, num_completion)})


def _choice(
    state: ServerState, index: int, completion: CompletionOutput, want_logprobs: bool
) -> dict[str, Any]:
    logprobs = None
    if want_logprobs and completion.logprobs is not None:
        logprobs = state.formatter.completion(completion.token_ids, completion.logprobs)
    return {
        "index": index,
        "text": completion.text,
        "logprobs": logprobs,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
    }


async def _events(
    state: ServerState,
    body: CompletionRequest,
    streams: Sequence[RequestStream],
    meta: dict[str, Any],
) -> AsyncIterator[str]:
    n = body.n or 1
    num_prompt = [s.num_prompt_tokens for s in streams]
    num_completion = [0] * (len(streams) * n)
    text_offset = [0] * (len(streams) * n)
    want_logprobs = body.logprobs is not None
    try:
        async for prompt_index, output in merged(streams):
            if not streamed(output):
                continue
            completion = output.outputs[0]
            index = prompt_index * n + completion.index
            new_tokens = output.delta_token_ids
            num_completion[index] = len(completion.token_ids)
            done = completion.finished()
            if not output.delta_text and not done and not (want_logprobs and new_tokens):
                continue  # text held back (it may become a stop string): nothing to show yet
            logprobs = None
            if want_logprobs and completion.logprobs is not None:
                start = len(completion.token_ids) - len(new_tokens)
                logprobs = state.formatter.completion(
                    new_tokens, completion.logprobs[start:], text_offset[index]
                )
            text_offset[index] += len(output.delta_text)
            chunk: dict[str, Any] = {
                **meta,
                "choices": [
                    {
                        "index": index,
                        "text": output.delta_text,
                        "logprobs": logprobs,
                        "finish_reason": completion.finish_reason if done else None,
                        "stop_reason": completion.stop_reason if done else None,
                    }
                ],
            }
            if body.include_usage:
                chunk["usage"] = (
                    usage(num_prompt[prompt_index], num_completion[index])
                    if body.continuous_usage
                    else None
                )
            yield sse(chunk)
        if body.include_usage:
            yield sse({**meta, "choices": [], "usage": usage(sum(num_prompt), sum(num_completion))})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
