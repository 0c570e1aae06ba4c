"""``infinite-llm bench prefix``: what a prefix cache saves on a multi-turn trace over shared
documents, for ours with and without its cache and for vLLM with its own.

Method: ``prefix_trace`` fixes every prompt (each user's turn ``t`` is ``doc + q1 + a1 + ... +
qt``; answers are the trace's, the server's are discarded), so every server sees the same
token ids. Users run closed loops, all at once (or staggered by ``--stagger``): a user sends its
next turn when the previous answer has finished. Each request streams exactly ``--output-len``
tokens (``ignore_eos``, greedy) from ``/v1/completions``; the client records TTFT, latency and
the cached tokens the server reports (``usage.prompt_tokens_details.cached_tokens``). Before the
trace, the repeat probe sends one ``--repeat-len`` prompt twice in a row: cold and warm TTFT.
``prefix_report`` says what is reported.

``--launch`` starts ``infinite-llm serve --server-args`` twice, one server at a time: ``ours``
(the prefix cache on, the default) and ``ours-no-cache`` (``--no-enable-prefix-caching``;
``--no-baseline`` skips it). ``--peer vllm`` (``vllm-eager``) serves the same model from vLLM's
own server with its prefix cache on (``make bench-peers``). Without ``--launch``, the server at
``--base-url`` is measured, labelled ``--label``.

    infinite-llm bench prefix --launch --server-args "--model tiny" --doc-len 200 --json
    infinite-llm bench prefix --launch --peer vllm --out /tmp/prefix   # SmolLM2, writes prefix.png
    infinite-llm bench prefix --base-url http://127.0.0.1:8000 --tokenizer smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from infinite_llm.bench.common import emit, format_table, machine_info
from infinite_llm.bench.prefix_report import (
    COLUMNS,
    ServerRun,
    TurnRecord,
    ratios,
    summarize,
    write_plot,
)
from infinite_llm.bench.prefix_trace import PrefixTrace, TraceConfig, UserTrace, make_trace
from infinite_llm.bench.serve import send_one
from infinite_llm.bench.serve_servers import (
    LaunchedServer,
    launch_model,
    peer_server,
    served_model,
    vocab_size_of,
)

NO_CACHE_FLAG = "--no-enable-prefix-caching"

# A server for the run: entering it starts it (if it is ours to start) and yields its base URL
# and the model name requests send (None: ask the server).
ServerFactory = Callable[[], AbstractContextManager[tuple[str, str | None]]]


async def run_trace(
    base_url: str,
    headers: dict[str, str],
    model: str,
    trace: PrefixTrace,
    args: argparse.Namespace,
    server: str,
) -> ServerRun:
    """A warm-up request (not measured), the repeat probe, then every user's closed loop."""
    num_users = len(trace.users)
    limits = httpx.Limits(max_connections=num_users + 1, max_keepalive_connections=num_users + 1)
    timeout = httpx.Timeout(args.timeout, connect=30)

    def payload(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    output_len = trace.config.output_len
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        await send_one(client, args.endpoint, payload(trace.warm_up_prompt, 2))
        cold = await send_one(client, args.endpoint, payload(trace.repeat_prompt, output_len))
        warm = await send_one(client, args.endpoint, payload(trace.repeat_prompt, output_len))
        bar = tqdm(
            total=trace.num_requests,
            desc=server,
            unit="req",
            disable=args.no_progress,
            file=sys.stderr,
        )
        start = time.perf_counter()

        async def user_loop(user: UserTrace) -> list[TurnRecord]:
            await asyncio.sleep(user.start_delay_s)
            records = []
            for turn, prompt in enumerate(user.prompts, start=1):
                result = await send_one(client, args.endpoint, payload(prompt, output_len))
                records.append(TurnRecord(user.user_id, turn, len(prompt), result))
                bar.update(1)
            return records

        per_user = await asyncio.gather(*(user_loop(u) for u in trace.users))
        makespan = time.perf_counter() - start
        bar.close()
    records = [r for user_records in per_user for r in user_records]
    return ServerRun(server, cold, warm, records, makespan)


@contextmanager
def launched(server_args: list[str]) -> Iterator[tuple[str, str | None]]:
    """Our server for one run; a server that exits or never answers raises ``RuntimeError``
    (with the end of its log)."""
    server = LaunchedServer(server_args)
    try:
        yield server.base_url, None
    finally:
        server.stop()


@contextmanager
def running(base_url: str) -> Iterator[tuple[str, str | None]]:
    """A server someone else started."""
    yield base_url, None


def servers_of(
    args: argparse.Namespace, our_model: str, max_model_len: int
) -> list[tuple[str, ServerFactory]]:
    """The servers to measure, in order: ours (launched with and without the cache, or the one
    at ``--base-url``), then each vLLM peer with its prefix cache on."""
    server_args = shlex.split(args.server_args)
    servers: list[tuple[str, ServerFactory]] = []
    if args.launch:
        servers.append(("ours", lambda: launched(server_args)))
        if not args.no_baseline:
            servers.append(("ours-no-cache", lambda: launched([*server_args, NO_CACHE_FLAG])))
    else:
        base_url = args.base_url.rstrip("/").removesuffix("/v1")
        servers.append((args.label, lambda: running(base_url)))
    for peer in args.peer:

        def factory(peer: str = peer) -> AbstractContextManager[tuple[str, str | None]]:
            return peer_server(peer, our_model, prefix_caching=True, max_model_len=max_model_len)

        servers.append((peer, factory))
    return servers


def measure(
    label: str,
    factory: ServerFactory,
    headers: dict[str, str],
    args: argparse.Namespace,
    trace: PrefixTrace,
) -> ServerRun:
    """Start (or reach) one server, run the probe and the trace on it, stop it."""
    with factory() as (base_url, name):
        model = name or args.model or served_model(base_url, headers)
        return asyncio.run(run_trace(base_url, headers, model, trace, args, label))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinite-llm bench prefix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = TraceConfig()
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server")
    p.add_argument("--label", default="ours", help="the --base-url server's name in the report")
    p.add_argument("--endpoint", default="/v1/completions", help="completions path on it")
    p.add_argument("--launch", action="store_true", help="start `infinite-llm serve` for the run")
    p.add_argument("--server-args", default="", help="arguments of our launched server")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help=f"with --launch: skip ours with {NO_CACHE_FLAG}",
    )
    p.add_argument(
        "--peer",
        nargs="*",
        default=[],
        choices=["vllm", "vllm-eager"],
        help="also serve the model with vLLM, prefix cache on (compiled / --enforce-eager)",
    )
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model whose vocabulary the trace uses (default: --model / the launched one)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary size (skips --tokenizer)"
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-docs", type=int, default=d.num_docs, help="shared documents")
    p.add_argument("--doc-len", type=int, default=d.doc_len, help="tokens per document")
    p.add_argument("--num-users", type=int, default=d.num_users, help="closed-loop users")
    p.add_argument("--turns", type=int, default=d.turns, help="questions per user")
    p.add_argument("--question-len", type=int, default=d.question_len)
    p.add_argument("--output-len", type=int, default=d.output_len, help="answer tokens per turn")
    p.add_argument("--repeat-len", type=int, default=d.repeat_len, help="repeat probe's prompt")
    p.add_argument(
        "--stagger", type=float, default=d.stagger_s, help="users start within this many s"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write prefix.png here")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (the table goes to stderr)"
    )
    return p


def trace_config(args: argparse.Namespace) -> TraceConfig:
    return TraceConfig(
        num_docs=args.num_docs,
        doc_len=args.doc_len,
        num_users=args.num_users,
        turns=args.turns,
        question_len=args.question_len,
        output_len=args.output_len,
        repeat_len=args.repeat_len,
        stagger_s=args.stagger,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = trace_config(args)
    sizes = (config.num_docs, config.doc_len, config.num_users, config.turns)
    if min(*sizes, config.question_len, config.output_len, config.repeat_len) < 1:
        print("error: every count and length must be at least 1", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.launch:
        our_model = args.tokenizer or launch_model(shlex.split(args.server_args))
    else:
        base_url = args.base_url.rstrip("/").removesuffix("/v1")
        our_model = args.tokenizer or args.model or served_model(base_url, headers)
    vocab = args.vocab_size or vocab_size_of(our_model)
    trace = make_trace(config, vocab)
    max_model_len = max(config.max_prompt_len(), config.repeat_len) + config.output_len
    rows, server_errors = [], []
    for label, factory in servers_of(args, our_model, max_model_len):
        try:
            run = measure(label, factory, headers, args, trace)
        except RuntimeError as exc:  # a server that did not come up (ours or vLLM's)
            print(f"error: {label} did not come up: {exc}", file=sys.stderr)
            server_errors.append({"server": label, "error": str(exc)})
            continue
        rows.append(summarize(run))
    result = {
        "bench": "prefix",
        "model": our_model,
        "server_args": args.server_args if args.launch else None,
        "base_url": None if args.launch else args.base_url,
        "config": {**asdict(config), "vocab_size": vocab, "max_model_len": max_model_len},
        "machine": machine_info(),
        "results": rows,
        "ratios": ratios(rows),
        "server_errors": server_errors,
    }
    title = (
        f"bench prefix: {our_model}, {config.num_users} users x {config.turns} turns on "
        f"{config.num_docs} docs of {config.doc_len} tokens, {config.output_len} out per turn "
        f"(times in ms, throughput in tokens/s)"
    )
    table = format_table(rows, COLUMNS, title)
    if result["ratios"]:
        table += "\n" + format_table(result["ratios"], list(result["ratios"][0]), "ours / peer")
    for error in server_errors:
        table += f"\n{error['server']}: did not come up: {error['error']}"
    if args.out is not None and rows:
        path = write_plot(rows, args.out)
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    emit(result, table, args.json)
    failed = any(row["failed"] or row.get("errors") for row in rows)
    return 1 if failed or server_errors or not rows else 0
