"""The official ``openai`` client against a real ``infinite-llm serve`` process on the tiny model.

Greedy answers must equal ``LLM.generate`` offline on the same weights, streamed or not.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from infinite_llm import LLM, SamplingParams

from .helpers import ServerProcess, wait_clean

PROMPTS = ["hello world", "The quick brown fox", "0123456789" * 3]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=tiny_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60
    )


def offline(llm: LLM, prompt, **kwargs) -> str:
    params = SamplingParams(temperature=0, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def offline_chat(llm: LLM, messages, **kwargs):
    return llm.chat(messages, SamplingParams(temperature=0, **kwargs), use_tqdm=False)[0].outputs[0]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.object == "model" and model.max_model_len == 2048


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_offline(
    client: openai.OpenAI, offline_llm: LLM, prompt: str
) -> None:
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.text == offline(offline_llm, prompt, max_tokens=20, ignore_eos=True)
    assert choice.finish_reason == "length" and choice.index == 0
    n_prompt = len(offline_llm.get_tokenizer().encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        20,
        n_prompt + 20,
    )


def test_streamed_completion_concatenates_to_the_same_text(
    client: openai.OpenAI, offline_llm: LLM
) -> None:
    prompt = PROMPTS[1]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 24
    assert all(c.usage is None for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == offline(
        offline_llm, prompt, max_tokens=24, ignore_eos=True
    )
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])


def test_token_id_prompts_and_batches(client: openai.OpenAI, offline_llm: LLM) -> None:
    ids = offline_llm.get_tokenizer().encode(PROMPTS[0])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(
        model="tiny", prompt=[PROMPTS[0]], max_tokens=8, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [
        offline(offline_llm, p, max_tokens=8) for p in PROMPTS
    ]


def test_stop_strings_and_max_tokens(client: openai.OpenAI, offline_llm: LLM) -> None:
    prompt = PROMPTS[0]
    full = offline(offline_llm, prompt, max_tokens=30, ignore_eos=True)
    stop = full[5:8]
    before = full[: full.index(stop)]  # the text up to where the stop string first appears
    r = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == before and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == before
    short = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="tiny",
                prompt="abc",
                max_tokens=24,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again and first != other


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    )
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        # Sampled + top 3 (fewer keys when distinct bytes decode to the same text, e.g. "\ufffd").
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == pytest.approx(
            max(top.values())
        )  # greedy: the sampled token is the likeliest
    assert lp.text_offset[0] == 0
    streamed = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert [t for c in streamed for t in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        lp.token_logprobs
    )


def test_chat_greedy_equals_offline_chat(client: openai.OpenAI, offline_llm: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    expected = offline_chat(offline_llm, messages, max_tokens=16)
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    prompt_ids = offline_llm.get_tokenizer().apply_chat_template(messages)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(
        expected.token_ids
    )
    # max_completion_tokens is the newer name of max_tokens.
    r2 = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=16, temperature=0
    )
    assert r2.choices[0].message.content == expected.text


def test_streamed_chat_with_usage(client: openai.OpenAI, offline_llm: LLM) -> None:
    messages = [{"role": "user", "content": "stream me"}]
    expected = offline_chat(offline_llm, messages, max_tokens=20, ignore_eos=True)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *content_chunks, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == expected.text
    assert content_chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob
        )
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_stop_token_ids_and_continuous_usage(tiny_server: ServerProcess, offline_llm: LLM) -> None:
    ids = (
        offline_llm.generate(
            "hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    stop_id = ids[3]
    if stop_id in ids[:3]:
        pytest.skip("the 4th token also appears earlier")
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stop_token_ids": [stop_id],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["usage"] is not None for e in events)
    assert (
        events[-2]["choices"][0]["finish_reason"] == "stop"
        and events[-2]["choices"][0]["stop_reason"] == stop_id
    )
    assert events[-1]["usage"]["completion_tokens"] == 4
    wait_clean(tiny_server.base_url)


def test_metrics_cluster_health_and_dashboard(
    tiny_server: ServerProcess, client: openai.OpenAI
) -> None:
    client.completions.create(
        model="tiny", prompt="count me", max_tokens=5, extra_body={"ignore_eos": True}
    )
    url = tiny_server.base_url
    assert httpx.get(url + "/health").status_code == 200
    text = httpx.get(url + "/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_preemptions_total",
        "ledger_edges",
        "false_replies_total",
        "migrated_blocks_total",
        "locality_mean",
    ):
        assert f"infinite_llm:{name}" in text, name
    for state in ("free", "used", "lent", "borrowed"):
        for instance in ("0", "1"):
            assert (
                f'infinite_llm:rblocks_{state}{{instance="{instance}",model_name="tiny"}}' in text
            )
    generated = next(
        line
        for line in text.splitlines()
        if line.startswith("infinite_llm:generation_tokens_total")
    )
    assert float(generated.split()[-1]) >= 5
    snap = wait_clean(url)
    assert snap["model"] == "tiny" and snap["fresh"] and snap["block_size"] == 8
    assert [len(i["block_owners"]) for i in snap["instances"]] == [256, 256]
    page = httpx.get(url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/cluster" in page.text and "<svg" in page.text
