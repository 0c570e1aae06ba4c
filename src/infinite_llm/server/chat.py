"""``POST /v1/chat/completions``: the model's chat template, then a completion, streamed or not.

Streaming follows OpenAI: a first chunk with the assistant role, content deltas, the finish
reason in the last choice chunk, then (with ``stream_options.include_usage``) one chunk with
no choices and the usage, then ``data: [DONE]``.

vLLM's template fields are honoured: ``add_generation_prompt``, ``continue_final_message``
(the reply continues the last assistant message; with ``echo`` that message's text comes
first), ``documents``, ``chat_template_kwargs``, and ``chat_template`` when the server trusts
request templates (``--trust-request-chat-template``).
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
    own_kwargs = body.template_kwargs()
    if body.chat_template is not None and not state.trust_request_chat_template:
        raise bad_request(
            "chat_template in a request is refused unless the server runs with "
            "--trust-request-chat-template",
            "chat_template",
        )
    tokenizer = state.engine.engine.tokenizer
    if not tokenizer.has_chat_template and body.chat_template is None:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages, tool_kwargs = template_inputs(
        body.template_messages(), tools, body.chat_template or tokenizer.chat_template
    )
    template_kwargs = {**own_kwargs, **tool_kwargs}
    try:
        prompt = await state.engine.run_in_tokenizer(
            lambda: tokenizer.apply_chat_template(
                messages, add_special_tokens=body.add_special_tokens, **template_kwargs
            )
        )
    except EngineDeadError:
        raise
    except Exception as exc:  # a template may raise anything (jinja errors, its own checks)
        raise bad_request(f"messages: the chat template failed: {exc}", "messages") from exc
    response_id = new_id("chatcmpl", body.request_id)
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
    choices = []
    for completion in output.outputs:
        message, finish_reason = assistant_message(tools, completion.text, completion.finish_reason)
        if body.echoed_text and message.get("content") is not None:
            message["content"] = body.echoed_text + message["content"]
        choice: dict[str, Any] = {
            "index": completion.index,
            "message": message,
            "logprobs": _logprobs(state, body, completion, completion.token_ids, top_k),
            "finish_reason": finish_reason,
            "stop_reason": completion.stop_reason,
        }
        if body.return_token_ids:
            choice["token_ids"] = completion.token_ids
        choices.append(choice)
    num_completion = sum(len(c.token_ids) for c in output.outputs)
    answer: dict[str, Any] = {**meta, "object": "chat.completion", "choices": choices}
    answer["usage"] = usage(
        len(output.prompt_token_ids), num_completion, output.num_cached_tokens or 0
    )
    if body.prompt_logprobs is not None:
        answer["prompt_logprobs"] = state.formatter.prompt(
            output.prompt_logprobs, output.prompt_logprob_ranks, output.prompt_token_ids
        )
    if body.return_token_ids:
        answer["prompt_token_ids"] = output.prompt_token_ids
    return JSONResponse(answer)


def _logprobs(
    state: ServerState,
    body: ChatCompletionRequest,
    completion: CompletionOutput,
    token_ids: list[int],
    top_k: int | None,
) -> Any:
    if top_k is None or completion.logprobs is None:
        return None
    start = len(completion.token_ids) - len(token_ids)
    return state.formatter.chat(
        token_ids, completion.logprobs[start:], top_k, bool(body.return_tokens_as_token_ids)
    )


async def _events(
    state: ServerState,
    body: ChatCompletionRequest,
    stream: RequestStream,
    meta: dict[str, Any],
    top_k: int | None,
    tools: ToolSetup | None = None,
) -> AsyncIterator[str]:
    meta = {**meta, "object": "chat.completion.chunk"}
    n = body.n or 1
    num_prompt = stream.num_prompt_tokens
    num_cached = 0  # once admitted
    num_completion = [0] * n

    def chunk(
        index: int,
        delta: dict[str, Any],
        logprobs: Any = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        token_ids: list[int] | None = None,
    ) -> str:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        if body.return_token_ids:
            choice["token_ids"] = token_ids or []
        data: dict[str, Any] = {**meta, "choices": [choice]}
        if body.return_token_ids and delta.get("role"):  # a choice's first chunk
            data["prompt_token_ids"] = stream.prompt_token_ids
        if body.include_usage:
            data["usage"] = (
                usage(num_prompt, sum(num_completion), num_cached)
                if body.continuous_usage
                else None
            )
        return sse(data)

    sent = [0] * n  # per choice: tokens sent (an output whose text is held back sends none)
    parsers = [tools.parser() if tools is not None else None for _ in range(n)]
    called = [False] * n
    try:
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""})
            if body.echoed_text:
                yield chunk(index, {"content": body.echoed_text})
        async for output in stream:
            if output.num_cached_tokens is not None:
                num_cached = output.num_cached_tokens
            if not streamed(output):
                continue
            completion = output.outputs[0]
            index = completion.index
            done = completion.finished()
            num_completion[index] = len(completion.token_ids)
            new_tokens = completion.token_ids[sent[index] :]
            parser = parsers[index]
            if parser is not None:  # tool calls: the parser's deltas, the last one finishing
                deltas = parser.feed(output.delta_text)
                deltas += parser.finish() if done else []
                if not deltas and not done:
                    continue  # held back (an open <tool_call>): its tokens go with the next chunk
                sent[index] = len(completion.token_ids)
                called[index] = called[index] or any("tool_calls" in d for d in deltas)
                logprobs = _logprobs(state, body, completion, new_tokens, top_k)
                last = deltas.pop() if done and deltas else None
                for delta in deltas:
                    yield chunk(index, delta, logprobs, token_ids=new_tokens)
                    logprobs, new_tokens = None, []
                if done:
                    assert tools is not None
                    reason = tool_finish_reason(tools, completion.finish_reason, called[index])
                    yield chunk(
                        index, last or {}, logprobs, reason, completion.stop_reason, new_tokens
                    )
                continue
            if not (output.delta_text or done or (top_k is not None and new_tokens)):
                continue
            sent[index] = len(completion.token_ids)
            logprobs = _logprobs(state, body, completion, new_tokens, top_k)
            content = output.delta_text
            delta: dict[str, Any] = {"content": content} if content or not done else {}
            if done:
                reason, stop_reason = completion.finish_reason, completion.stop_reason
                yield chunk(index, delta, logprobs, reason, stop_reason, new_tokens)
            else:
                yield chunk(index, delta, logprobs, token_ids=new_tokens)
        if body.include_usage:
            total = usage(num_prompt, sum(num_completion), num_cached)
            yield sse({**meta, "choices": [], "usage": total})
    except STREAM_ERRORS as exc:
        yield sse_error(exc)
    yield sse("[DONE]")
