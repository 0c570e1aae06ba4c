"""The prefix cache as clients see it, through the official ``openai`` client:
``usage.prompt_tokens_details.cached_tokens`` (whole, streamed, ``n`` > 1, chat), the
``prefix_cache_*`` counters and cached rBlocks on ``/metrics``, and ``/v1/cluster``; a server
without the cache reports 0.

The tiny server's rBlocks hold 8 tokens: a prompt sent again finds every full rBlock of it
but the one holding its last token (whose logits are needed) cached. Each test sends prompts
of its own, so that what other tests left cached does not count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import loaded_model, random_prompts
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.server.app import create_app
from infinite_llm.server.settings import ServerSettings

from .helpers import ServerProcess, ThreadServer, cluster, wait_clean

BLOCK_SIZE = 8  # the tiny server's


def client_of(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return client_of(tiny_server.base_url)


@pytest.fixture(scope="module")
def uncached_server() -> Iterator[ThreadServer]:
    """The tiny server's pools with prefix caching off (``--no-enable-prefix-caching``)."""
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=64, enable_prefix_caching=False)
    engine = LLMEngine(
        EngineConfig(model="tiny", num_instances=2, cache=cache),
        loaded_model("tiny"),
        progress=False,
    )
    server = ThreadServer(create_app(engine, ServerSettings(served_model_names=("tiny",))))
    yield server
    server.stop()


def full_blocks(num_prompt_tokens: int) -> int:
    """The prompt tokens a second identical request finds cached."""
    return (num_prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


def complete(client: openai.OpenAI, prompt: list[int], **kwargs) -> openai.types.Completion:
    return client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, **kwargs
    )


def streamed_usage(client: openai.OpenAI, **kwargs) -> openai.types.CompletionUsage:
    """The usage of the last chunk (``stream_options.include_usage``) of a streamed request."""
    create = client.chat.completions.create if "messages" in kwargs else client.completions.create
    chunks = list(
        create(
            model="tiny",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    assert chunks[-1].choices == []
    return chunks[-1].usage


def cached_tokens(usage: openai.types.CompletionUsage) -> int:
    assert usage.prompt_tokens_details is not None
    return usage.prompt_tokens_details.cached_tokens


def test_a_repeated_prompt_reports_its_cached_tokens(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    prompt = random_prompts(1, (61, 61), 256, seed=101)[0]
    first = complete(client, prompt)
    assert first.usage.prompt_tokens == 61 and cached_tokens(first.usage) == 0
    again = complete(client, prompt)
    assert cached_tokens(again.usage) == full_blocks(61) == 56
    assert cached_tokens(streamed_usage(client, prompt=prompt)) == 56
    # Continuous usage stats carry it too, once the request is admitted.
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert {e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in events} == {56}
    wait_clean(tiny_server.base_url)


def test_a_streamed_first_request_reports_none_cached(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    prompt = random_prompts(1, (40, 40), 256, seed=102)[0]
    assert cached_tokens(streamed_usage(client, prompt=prompt)) == 0
    assert cached_tokens(streamed_usage(client, prompt=prompt)) == full_blocks(40) == 32
    wait_clean(tiny_server.base_url)


def test_chat_reports_cached_tokens_whole_and_streamed(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    messages = [{"role": "user", "content": "Tell me about prefix caches. " * 8}]
    first = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0
    )
    num_prompt = first.usage.prompt_tokens
    assert num_prompt > 2 * BLOCK_SIZE and cached_tokens(first.usage) == 0
    again = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0
    )
    assert cached_tokens(again.usage) == full_blocks(num_prompt)
    assert cached_tokens(streamed_usage(client, messages=messages)) == full_blocks(num_prompt)
    wait_clean(tiny_server.base_url)


def test_several_samples_and_prompts_report_each_prompt_once(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    # The samples after the first share its prompt rBlocks: that is no cache hit.
    a, b = random_prompts(2, (33, 33), 256, seed=103)
    first = complete(client, a, n=3)
    assert len(first.choices) == 3 and cached_tokens(first.usage) == 0
    again = complete(client, a, n=3)
    assert (again.usage.prompt_tokens, cached_tokens(again.usage)) == (33, full_blocks(33))
    # Two prompts, one seen: the usage adds both prompts' figures, streamed or not.
    both = complete(client, [a, b], n=2)
    assert (both.usage.prompt_tokens, cached_tokens(both.usage)) == (66, 32)
    usage = streamed_usage(client, prompt=[a, b], n=2)
    assert (usage.prompt_tokens, cached_tokens(usage)) == (66, 64)
    wait_clean(tiny_server.base_url)


def metric(text: str, name: str) -> float:
    """The sum of a metric's series over its labels."""
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f"infinite_llm:{name}{{")
    )


def test_metrics_count_prefix_cache_queries_and_hits(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    url = tiny_server.base_url
    wait_clean(url)
    before = httpx.get(url + "/metrics").text
    prompt = random_prompts(1, (50, 50), 256, seed=104)[0]
    complete(client, prompt)
    complete(client, prompt)
    snap = wait_clean(url)
    text = httpx.get(url + "/metrics").text
    queries = metric(text, "prefix_cache_queries_total") - metric(
        before, "prefix_cache_queries_total"
    )
    hits = metric(text, "prefix_cache_hits_total") - metric(before, "prefix_cache_hits_total")
    assert (queries, hits) == (100, full_blocks(50))
    for inst in snap["instances"]:  # /v1/cluster and /metrics agree, per instance
        labels = f'{{instance="{inst["instance_id"]}",model_name="tiny"}}'
        assert f"infinite_llm:rblocks_cached{labels} {float(inst['cached'])}" in text
        assert f"infinite_llm:prefix_cache_hits_total{labels} " in text
        assert inst["cached"] == len(inst["cached_block_ids"])
    assert sum(i["cached"] for i in snap["instances"]) >= full_blocks(50) // BLOCK_SIZE


def test_without_the_prefix_cache_nothing_is_cached(uncached_server: ThreadServer) -> None:
    client = client_of(uncached_server.base_url)
    prompt = random_prompts(1, (61, 61), 256, seed=105)[0]
    for _ in range(2):
        assert cached_tokens(complete(client, prompt).usage) == 0
    assert cached_tokens(streamed_usage(client, prompt=prompt)) == 0
    assert cached_tokens(complete(client, prompt, n=2).usage) == 0
    url = uncached_server.base_url
    snap = wait_clean(url)
    assert all(i["cached"] == 0 and i["cached_block_ids"] == [] for i in snap["instances"])
    text = httpx.get(url + "/metrics").text
    assert metric(text, "prefix_cache_queries_total") == 0
    assert metric(text, "prefix_cache_hits_total") == metric(text, "rblocks_cached") == 0
    assert cluster(url)["instances"][0]["prefix_cache_hits"] == 0
