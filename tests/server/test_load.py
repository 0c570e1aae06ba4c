"""64 concurrent streaming clients on small pools: long prompts borrow, a quarter hang up mid-stream.

Every other request must stream exactly its greedy answer when run alone, and afterwards every
rBlock is free and the debt ledger empty.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from infinite_llm import LLM, SamplingParams

from .conftest import SMALL_MAX_MODEL_LEN
from .helpers import ServerProcess, cluster, wait_clean

NUM_CLIENTS = 64
MAX_TOKENS = 12


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    # 16 rBlocks x 4 tokens per instance: prompts past 64 tokens cannot fit their home pool alone.
    rng = random.Random(seed)
    return [
        [rng.randrange(3, 250) for _ in range(rng.randint(40, SMALL_MAX_MODEL_LEN - MAX_TOKENS))]
        for _ in range(n)
    ]


async def stream_one(client: httpx.AsyncClient, prompt: list[int], hang_up: bool) -> str | None:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])
            if hang_up and text:
                return None  # leaving the block closes the connection mid-stream
    return "".join(text)


def test_concurrent_streams_with_borrowing_and_disconnects(
    small_server: ServerProcess, offline_llm: LLM
) -> None:
    prompts = make_prompts(NUM_CLIENTS)
    hang_ups = [i % 4 == 3 for i in range(NUM_CLIENTS)]
    borrowed_before = cluster(small_server.base_url)["blocks_borrowed"]

    async def main() -> list[str | None]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(
            base_url=small_server.base_url, timeout=120, limits=limits
        ) as client:
            return await asyncio.gather(
                *(stream_one(client, p, h) for p, h in zip(prompts, hang_ups))
            )

    texts = asyncio.run(main())
    kept = [i for i in range(NUM_CLIENTS) if not hang_ups[i]]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = offline_llm.generate([prompts[i] for i in kept], params, use_tqdm=False)
    assert [texts[i] for i in kept] == [o.outputs[0].text for o in expected]
    snap = wait_clean(small_server.base_url, timeout_s=30)
    assert snap["blocks_borrowed"] > borrowed_before  # long prompts did borrow
