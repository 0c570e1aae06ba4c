"""``infinite-llm bench serve``: an open-loop client for any OpenAI-compatible server (ours or vLLM).

Method (vLLM's ``benchmark_serving``): random token-id prompts of ``--input-len`` tokens, each
asking for exactly ``--output-len`` tokens (``ignore_eos``, greedy), sent to ``/v1/completions``
with streaming, arrivals a Poisson process at each ``--request-rate`` (``inf``: all at once).
Per request: TTFT (first token), ITL (between streamed chunks), TPOT ((latency - TTFT) /
(output tokens - 1)), end-to-end latency; per run: request and token throughput, the prompt
tokens the server found in its prefix cache and the most rBlocks it held (from its Prometheus
metrics, scraped every 50 ms; None for a server without them). Every rate, and the warm-up
request before it, has its own prompts, so a cache finds nothing of another's. Output tokens
are the server's own count (``stream_options.include_usage``).

``--n`` asks for that many samples per request (parallel sampling: output tokens count every
sample, TTFT and ITL any sample's chunks); each rate then runs again as ``--n`` separate
requests per prompt, and the table compares the two (``bench sampling`` counts the rBlocks
step by step inside one engine). ``--launch`` starts ``infinite-llm serve`` with
``--server-args`` for the run; otherwise ``--base-url`` is used. ``--peer vllm`` (and
``vllm-eager``) then serves the same model from vLLM's own server (its venv from ``make
bench-peers``; compiled, or with ``--enforce-eager``) and runs the same prompts at the same
rates, one server at a time, so the table holds both and their ratios.

    infinite-llm bench serve --launch --server-args "--model tiny" --request-rate 4 inf --json
    infinite-llm bench serve --launch --peer vllm vllm-eager --input-len 256 --request-rate 4 inf
    infinite-llm bench serve --base-url http://127.0.0.1:8011 --model /tmp/smollm2-hf --tokenizer smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from infinite_llm.bench.common import emit, format_table, machine_info
from infinite_llm.bench.serve_report import COLUMNS, ratios, summarize
from infinite_llm.bench.serve_servers import (
    LaunchedServer,
    launch_model,
    peak_rblocks,
    peer_server,
    served_model,
    vocab_size_of,
)


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0  # the server's count (usage), 0 without one
    num_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported


def make_prompts(n: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids away from both ends of the vocabulary (where special tokens live)."""
    rng = random.Random(seed)
    margin = min(100, vocab_size // 4)
    return [
        [rng.randrange(margin, vocab_size - margin) for _ in range(input_len)] for _ in range(n)
    ]


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson arrivals, or all at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()]  # the first request goes at once


async def send_one(
    client: httpx.AsyncClient, endpoint: str, payload: dict[str, Any]
) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", endpoint, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            num_chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:300]
                    return result
                if usage := event.get("usage"):
                    result.num_output_tokens = int(usage.get("completion_tokens") or 0)
                    result.num_prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    result.num_cached_tokens = None if cached is None else int(cached)
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                num_chunks += 1
            result.latency_s = time.perf_counter() - start
            if result.num_output_tokens == 0:
                result.num_output_tokens = num_chunks  # a server without usage: one token per chunk
            result.ok = num_chunks > 0
            if not result.ok:
                result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_rate(
    base_url: str,
    headers: dict[str, str],
    model: str,
    prompts: Sequence[list[int]],
    args: argparse.Namespace,
    rate: float,
    separate: bool = False,
) -> tuple[list[RequestResult], float, int | None]:
    """``prompts[0]`` warms the server up (not measured); the rest are sent at ``rate``: each
    asks for ``--n`` samples, or, ``separate``, is sent as ``--n`` requests of one sample at
    once. Returns the results, the duration and the peak rBlocks in use (``peak_rblocks``)."""
    warm, prompts = prompts[0], prompts[1:]
    delays = arrival_delays(len(prompts), rate, args.seed)
    width = args.n if separate else 1  # requests per arrival
    limits = httpx.Limits(
        max_connections=width * len(prompts) + 2,
        max_keepalive_connections=width * len(prompts) + 2,
    )
    timeout = httpx.Timeout(args.timeout, connect=30)
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(
        total=len(prompts),
        desc=f"rate {rate:g} req/s" + (f", {args.n} separate" if separate else ""),
        unit="req",
        disable=args.no_progress,
        file=sys.stderr,
    )
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:

        def payload(prompt: list[int]) -> dict[str, Any]:
            return {
                "model": model,
                "prompt": prompt,
                "max_tokens": args.output_len,
                "n": 1 if separate else args.n,
                "temperature": 0.0 if args.n == 1 else 1.0,  # n greedy samples would be equal
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        warm_up = {**payload(warm), "max_tokens": 2}
        await send_one(client, args.endpoint, warm_up)  # not measured
        done = asyncio.Event()
        memory = asyncio.create_task(peak_rblocks(client, done))
        start = time.perf_counter()

        async def one(prompt: list[int], delay: float) -> list[RequestResult]:
            await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
            body = payload(prompt)
            async with gate or contextlib.nullcontext():  # the cap counts prompts in flight
                sent = [send_one(client, args.endpoint, body) for _ in range(width)]
                results = list(await asyncio.gather(*sent))
            bar.update(1)
            return results

        per_prompt = await asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays)))
        duration = time.perf_counter() - start
        done.set()
        peak = await memory
    bar.close()
    return [r for results in per_prompt for r in results], duration, peak


def rate_prompts(args: argparse.Namespace, vocab: int) -> list[list[list[int]]]:
    """Per run, its own random prompts (seed + the run's index), the first of them the warm-up:
    a server with a prefix cache must not find one run's prompts from another, nor a measured
    prompt from the warm-up. Runs: each rate of ``--request-rate`` in order, then, with ``--n``
    above 1, each rate again as separate requests."""
    runs = len(args.request_rate) * (2 if args.n > 1 else 1)
    return [
        make_prompts(args.num_prompts + 1, args.input_len, vocab, args.seed + i)
        for i in range(runs)
    ]


def run_rates(
    base_url: str,
    headers: dict[str, str],
    model: str,
    prompts: list[list[list[int]]],
    args: argparse.Namespace,
    server: str,
) -> list[dict[str, Any]]:
    """A row per rate; with ``--n`` above 1, a row per rate for ``--n`` separate requests per
    prompt too (server ``"<server>, <n> separate"``)."""
    rows = []
    runs = [(rate, False) for rate in args.request_rate]
    if args.n > 1:
        runs += [(rate, True) for rate in args.request_rate]
    for (rate, separate), own in zip(runs, prompts, strict=True):
        results, duration, peak = asyncio.run(
            run_rate(base_url, headers, model, own, args, rate, separate)
        )
        name = f"{server}, {args.n} separate" if separate else server
        summary = summarize(results, duration, args.input_len, rate, peak)
        rows.append({"server": name, **summary})
    return rows


def run_peer(
    peer: str, model: str, prompts: list[list[list[int]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The same prompts and rates against vLLM's server (``peer``) on ``model``."""
    with peer_server(peer, model) as (base_url, served_name):
        return run_rates(base_url, {}, served_name, prompts, args, peer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinite-llm bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="an OpenAI-compatible server"
    )
    p.add_argument("--endpoint", default="/v1/completions", help="completions path on that server")
    p.add_argument("--launch", action="store_true", help="start `infinite-llm serve` for the run")
    p.add_argument(
        "--server-args", default="", help="arguments of the launched server (one string)"
    )
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model whose vocabulary the random prompts use (default: --model / the launched one)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary size (skips --tokenizer)"
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="samples per request (parallel sampling)")
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="cap on prompts in flight (with --n, each sent as its n separate requests too)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--peer",
        nargs="*",
        default=[],
        choices=["vllm", "vllm-eager"],
        help="also serve the model with vLLM (compiled / --enforce-eager) on the same workload "
        "(needs `make bench-peers`; with --launch or --tokenizer naming our model)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (the table goes to stderr)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.num_prompts, args.input_len, args.output_len, args.n) < 1:
        print(
            "error: --num-prompts, --input-len, --output-len and --n must be at least 1",
            file=sys.stderr,
        )
        return 2
    server_args = shlex.split(args.server_args)
    launched = LaunchedServer(server_args) if args.launch else None
    try:
        base_url = launched.base_url if launched else args.base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or served_model(base_url, headers)
        our_model = args.tokenizer or (launch_model(server_args) if launched else model)
        vocab = args.vocab_size or vocab_size_of(our_model)
        prompts = rate_prompts(args, vocab)
        rows = run_rates(base_url, headers, model, prompts, args, "infinite-llm")
    finally:
        if launched is not None:
            launched.stop()
    for peer in args.peer:
        rows += run_peer(peer, our_model, prompts, args)
    result = {
        "bench": "serve",
        "base_url": "launched: infinite-llm serve " + args.server_args if launched else base_url,
        "model": model,
        "config": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "n": args.n,
            "seed": args.seed,
            "max_concurrency": args.max_concurrency,
            "vocab_size": vocab,
        },
        "machine": machine_info(),
        "results": rows,
        "ratios": ratios(rows),
    }
    title = (
        f"bench serve: {model}, {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out "
        f"(times in ms, throughput per s)"
    )
    table = format_table(rows, COLUMNS, title)
    if result["ratios"]:
        table += "\n" + format_table(result["ratios"], list(result["ratios"][0]), "ours / peer")
    emit(result, table, args.json)
    return 0 if all(row["failed"] == 0 for row in rows) else 1
