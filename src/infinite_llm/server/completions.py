"""``POST /v1/completions``: text completions, streamed by SSE or in one JSON answer.

A prompt is a string, token ids, or a list of either (one choice per prompt, as vLLM does).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from infinite_llm.outputs import RequestOutput
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
    choices = [_choice(state, i, out, body.logprobs is not None) for i, out in enumerate(outputs)]
    num_prompt = sum(len(out.prompt_token_ids) for out in outputs)
    num_completion = sum(len(out.outputs[0].token_ids) for out in outputs)
    return JSONResponse({**meta, "choices": choices, "usage": usage(num_prompt, num_completion)})


def _choice(
    state: ServerState, index: int, output: RequestOutput, want_logprobs: bool
) -> dict[str, Any]:
    completion = output.outputs[0]
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
    num_prompt = [s.num_prompt_tokens for s in streams]
    num_completion = [0] * len(streams)
    text_offset = [0] * len(streams)
    want_logprobs = body.logprobs is not None
    try:
        async for index, output in merged(streams):
            completion = output.outputs[0]
            new_tokens = output.delta_token_ids
            num_completion[index] = len(completion.token_ids)
            if not output.delta_text and not output.finished and not (want_logprobs and new_tokens):
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
                        "finish_reason": completion.finish_reason if output.finished else None,
                        "stop_reason": completion.stop_reason if output.finished else None,
                    }
                ],
            }
            if body.include_usage:
                chunk["usage"] = (
                    usage(num_prompt[index], num_completion[index])
                    if body.continuous_usage
                    else None
                )
            yield sse(chunk)
        if body.include_usage:
            yield sse({**meta, "choices": [], "usage": usage(sum(num_prompt), sum(num_completion))})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
