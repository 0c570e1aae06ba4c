"""``POST /v1/completions``: text completions, streamed by SSE or in one JSON answer.

A prompt is a string, token ids, or a list of either (``n`` choices per prompt, as vLLM
does: choice ``prompt_index * n + sample_index``).
``echo`` puts the prompt before the completion (its tokens with logprobs when asked; with
``max_tokens: 0`` the prompt alone, to score it); ``return_token_ids`` adds the prompt's and
the completion's token ids to each choice, as vLLM does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from infinite_llm.outputs import CompletionOutput, RequestOutput
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
    response_id = new_id("cmpl", body.request_id)
    streams = await start_requests(
        state, prompts, params, response_id, "prompt", body.add_special_tokens
    )
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
    n = params.n
    choices = [
        _choice(state, body, i * n + c.index, out, c)
        for i, out in enumerate(outputs)
        for c in out.outputs
    ]
    num_prompt = sum(len(out.prompt_token_ids) for out in outputs)
    num_cached = sum(out.num_cached_tokens or 0 for out in outputs)
    num_completion = 0
    if not body.prompt_only:
        num_completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    answer_usage = usage(num_prompt, num_completion, num_cached)
    return JSONResponse({**meta, "choices": choices, "usage": answer_usage})


def _prompt_text(state: ServerState, output: RequestOutput) -> str:
    if output.prompt is not None:
        return output.prompt
    return state.engine.engine.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)


@dataclass
class _Shown:
    """What a choice shows of a completion (or of its newest part, streamed): ``max_tokens: 0``
    with ``echo`` shows no generated token; ``echo`` puts the prompt first."""

    text: str
    token_ids: list[int]
    entries: list[dict[int, float] | None] | None  # logprobs, one per token id
    finish_reason: str | None
    stop_reason: int | str | None

    @classmethod
    def of(
        cls,
        state: ServerState,
        body: CompletionRequest,
        output: RequestOutput,
        completion: CompletionOutput,
        part: tuple[str, list[int], list[dict[int, float]] | None],
        with_prompt: bool,
    ) -> _Shown:
        text, token_ids, entries = part
        shown = cls(
            text,
            token_ids,
            list(entries) if entries is not None else None,
            completion.finish_reason,
            completion.stop_reason,
        )
        if body.prompt_only:  # the one token computed to reach the prompt's end is not shown
            shown.text, shown.token_ids = "", []
            shown.entries = [] if entries is not None else None
            shown.finish_reason, shown.stop_reason = "length", None
        if body.echo and with_prompt:
            shown.text = _prompt_text(state, output) + shown.text
            shown.token_ids = output.prompt_token_ids + shown.token_ids
            if shown.entries is not None:
                shown.entries = [*(output.prompt_logprobs or []), *shown.entries]
        return shown


def _choice(
    state: ServerState,
    body: CompletionRequest,
    index: int,
    output: RequestOutput,
    completion: CompletionOutput,
) -> dict[str, Any]:
    whole = (completion.text, completion.token_ids, completion.logprobs)
    shown = _Shown.of(state, body, output, completion, whole, with_prompt=True)
    logprobs = None
    if body.logprobs is not None and shown.entries is not None:
        logprobs = state.formatter.completion(
            shown.token_ids, shown.entries, as_ids=bool(body.return_tokens_as_token_ids)
        )
    choice: dict[str, Any] = {
        "index": index,
        "text": shown.text,
        "logprobs": logprobs,
        "finish_reason": shown.finish_reason,
        "stop_reason": shown.stop_reason,
    }
    if body.prompt_logprobs is not None:
        choice["prompt_logprobs"] = state.formatter.prompt(
            output.prompt_logprobs, output.prompt_logprob_ranks, output.prompt_token_ids
        )
    if body.return_token_ids:
        choice["prompt_token_ids"] = output.prompt_token_ids
        choice["token_ids"] = [] if body.prompt_only else completion.token_ids
    return choice


async def _events(
    state: ServerState,
    body: CompletionRequest,
    streams: Sequence[RequestStream],
    meta: dict[str, Any],
) -> AsyncIterator[str]:
    n = body.n or 1
    num_prompt = [s.num_prompt_tokens for s in streams]
    num_cached = [0] * len(streams)  # per prompt, once admitted
    choices = len(streams) * n
    num_completion = [0] * choices
    text_offset = [0] * choices
    started = [False] * choices  # the first chunk (echoed prompt, prompt ids) went out
    sent = [0] * choices  # completion tokens sent so far
    want_logprobs = body.logprobs is not None
    as_ids = bool(body.return_tokens_as_token_ids)
    try:
        async for prompt_index, output in merged(streams):
            if output.num_cached_tokens is not None:
                num_cached[prompt_index] = output.num_cached_tokens
            if not streamed(output):
                continue
            completion = output.outputs[0]
            index = prompt_index * n + completion.index
            done = completion.finished()
            if body.prompt_only and not done:
                continue
            # Tokens since the last chunk sent (an output whose text is held back sends none).
            new_tokens = completion.token_ids[sent[index] :]
            entries = None
            if want_logprobs and completion.logprobs is not None:
                entries = completion.logprobs[sent[index] :]
            first = not started[index]
            shown = _Shown.of(
                state, body, output, completion, (output.delta_text, new_tokens, entries), first
            )
            if not body.prompt_only:
                num_completion[index] = len(completion.token_ids)
            if not (shown.text or done or first or (want_logprobs and new_tokens)):
                continue  # text held back (it may become a stop string): nothing to show yet
            sent[index] = len(completion.token_ids)
            started[index] = True
            choice: dict[str, Any] = {"index": index}
            if first and body.return_token_ids:
                choice["prompt_token_ids"] = output.prompt_token_ids
            logprobs = None
            if shown.entries is not None:
                logprobs = state.formatter.completion(
                    shown.token_ids, shown.entries, text_offset[index], as_ids
                )
                text_offset[index] += state.formatter.text_length(shown.token_ids)
            choice["text"] = shown.text
            choice["logprobs"] = logprobs
            choice["finish_reason"] = shown.finish_reason if done else None
            choice["stop_reason"] = shown.stop_reason if done else None
            if body.return_token_ids:
                choice["token_ids"] = [] if body.prompt_only else new_tokens
            chunk: dict[str, Any] = {**meta, "choices": [choice]}
            if body.include_usage:
                chunk["usage"] = (
                    usage(num_prompt[prompt_index], num_completion[index], num_cached[prompt_index])
                    if body.continuous_usage
                    else None
                )
            yield sse(chunk)
        if body.include_usage:
            total = usage(sum(num_prompt), sum(num_completion), sum(num_cached))
            yield sse({**meta, "choices": [], "usage": total})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
