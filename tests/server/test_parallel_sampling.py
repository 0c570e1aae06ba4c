"""``n`` and ``best_of`` through the official ``openai`` client: n choices per prompt, streamed
and not streamed alike, usage counted as OpenAI does (the prompt once, every choice's tokens)."""

from __future__ import annotations

import openai
import pytest

from infinite_llm import LLM, SamplingParams

from .helpers import ServerProcess, wait_clean

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tiny_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60
    )


def test_n_greedy_choices_equal_the_offline_answer(
    client: openai.OpenAI, offline_llm: LLM, tiny_server: ServerProcess
) -> None:
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        n=3,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = offline_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [want] * 3
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    n_prompt = len(offline_llm.get_tokenizer().encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        36,
        n_prompt + 36,
    )
    wait_clean(tiny_server.base_url)


def test_streamed_and_whole_completions_agree_per_choice(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    prompts = [PROMPT, "hello world"]
    kwargs = dict(model="tiny", prompt=prompts, n=2, max_tokens=10, seed=5, temperature=1.0)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    *text_chunks, usage_chunk = chunks
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in text_chunks:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            assert choice.index not in finish, "one finish per choice"
            finish[choice.index] = choice.finish_reason
    # choice index = prompt_index * n + sample_index
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert whole.choices[0].text != whole.choices[1].text  # two samples, two seeds
    streamed, once = usage_chunk.usage.model_dump(), whole.usage.model_dump()
    # the same prompts again: the stream finds at least what the first found cached, and theirs
    cached = streamed.pop("prompt_tokens_details")["cached_tokens"]
    assert cached % 8 == 0 and cached >= once.pop("prompt_tokens_details")["cached_tokens"]
    assert streamed == once
    wait_clean(tiny_server.base_url)


def test_chat_n_streamed_and_whole_agree(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    kwargs = dict(model="tiny", messages=CHAT, n=2, max_tokens=8, seed=3, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1]
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    *deltas, usage_chunk = chunks
    texts: dict[int, str] = {}
    roles = []
    for chunk in deltas:
        (choice,) = chunk.choices
        if choice.delta.role:
            roles.append(choice.index)
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert roles == [0, 1]
    assert texts == {c.index: c.message.content for c in whole.choices}
    streamed, once = usage_chunk.usage.model_dump(), whole.usage.model_dump()
    # the same prompt again: the stream found its full rBlocks (8 tokens) in the prefix cache
    cached = streamed.pop("prompt_tokens_details")["cached_tokens"]
    assert cached == (whole.usage.prompt_tokens - 1) // 8 * 8 > 0
    once.pop("prompt_tokens_details")
    assert streamed == once
    wait_clean(tiny_server.base_url)


def test_best_of_returns_n_of_the_best(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        n=2,
        best_of=4,
        max_tokens=8,
        seed=1,
        temperature=1.0,
        logprobs=0,
    )
    assert [c.index for c in r.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert totals[0] >= totals[1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    wait_clean(tiny_server.base_url)
