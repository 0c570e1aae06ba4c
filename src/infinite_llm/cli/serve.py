"""``infinite-llm serve``: the OpenAI-compatible server on one cluster of instances.

Defaults: the embedded SmolLM2, 2 in-process instances whose KV pools are sized from the
memory available at start (at most 2 GiB each, a quarter of what is free in all), steps of
at most 512 tokens (``DEFAULT_SERVE_BATCHED_TOKENS``), on 127.0.0.1:8000. Bind another address only with ``--host`` (and set ``--api-key`` then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from infinite_llm.cli.engine_args import add_engine_args, engine_config_from_args, parse_bytes
from infinite_llm.server.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_WAITING_REQUESTS,
    ServerSettings,
)

DEFAULT_NUM_INSTANCES = 2
# A step's token budget when serving. A request's first token comes when the step holding the
# end of its prompt ends, so every prompt of a step waits for the whole step: on a CPU a
# 2048-token step takes about 3 s (SmolLM2, 2 cores), 512 tokens about 0.8 s. Smaller steps
# cost no throughput here (the linears run at the same rate from a few hundred rows up).
DEFAULT_SERVE_BATCHED_TOKENS = 512
API_KEY_ENV = "INFINITE_LLM_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, metrics, dashboard)"
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer <key>' on /v1/* (default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients send and see (default: the --model value)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=DEFAULT_MAX_WAITING_REQUESTS,
        help="requests waiting for a first token before new ones get 503 (0: no limit)",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=parse_bytes,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get 413 (e.g. 16M)",
    )
    g.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render chat requests with a chat_template field they bring (a client's Jinja)",
    )
    add_engine_args(p)
    p.set_defaults(
        func=run,
        num_instances=DEFAULT_NUM_INSTANCES,
        max_num_batched_tokens=DEFAULT_SERVE_BATCHED_TOKENS,
    )


def usage_banner(base_url: str, model: str, api_key: str | None) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 64,
            "temperature": 0,
        }
    )
    return "\n".join(
        [
            f"Ready: {base_url}/v1 (OpenAI API)   dashboard: {base_url}/dashboard   metrics: {base_url}/metrics",
            "Try it:",
            f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            "  python -c 'from openai import OpenAI; "
            f'c = OpenAI(base_url="{base_url}/v1", api_key="{api_key or "EMPTY"}"); '
            f'print(c.chat.completions.create(model="{model}", max_tokens=64, '
            'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)\'',
        ]
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from infinite_llm.llm_engine import LLMEngine
    from infinite_llm.server.app import create_app

    names = tuple(args.served_model_name or [args.model])
    try:
        settings = ServerSettings(
            served_model_names=names,
            api_key=args.api_key or None,
            max_waiting_requests=args.max_waiting_requests or None,
            max_body_bytes=args.max_request_body_bytes,
            trust_request_chat_template=args.trust_request_chat_template,
        )
        config = engine_config_from_args(args)
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cluster = engine.cluster
    host = f"[{args.host}]" if ":" in args.host else args.host
    base_url = f"http://{host}:{args.port}"
    pools = (
        f"{config.num_instances} instance(s) x {cluster.num_blocks_per_instance} rBlocks of "
        f"{cluster.block_size} tokens, borrowing {'off' if args.no_borrow else 'on'}"
    )

    def on_started() -> None:
        print(
            f"infinite-llm serving {names[0]} ({engine.loaded.source.name}): {pools}, "
            f"max_model_len {engine.max_model_len}",
            flush=True,
        )
        print(usage_banner(base_url, names[0], settings.api_key), flush=True)

    app = create_app(engine, settings, on_started=on_started)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=5,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        draining_server(config, app.state.server.engine.drain_threadsafe).run()
    return 0


def draining_server(config: Any, drain: Callable[[], None]) -> Any:
    """A uvicorn server that, on SIGINT/SIGTERM, first ends the streams in flight (an error event,
    then ``[DONE]``, their requests aborted) so that shutting down does not wait on them."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain()
            super().handle_exit(sig, frame)

    return _Server(config)
