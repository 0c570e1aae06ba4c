"""``infinite-llm bench <name> [args]``: run one of the project's benchmarks (each prints JSON + a table)."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": "infinite_llm.bench.engine",
    "attention": "infinite_llm.bench.attention",
    "memory": "infinite_llm.bench.memory",
    "serve": "infinite_llm.bench.serve",
    "prefix": "infinite_llm.bench.prefix",
    "sampling": "infinite_llm.bench.parallel_sampling",
    "capacity": "infinite_llm.bench.capacity",
    "distributed": "infinite_llm.bench.distributed",
    "channels": "infinite_llm.bench.channels",
    "paper": "infinite_llm.bench.paper",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHES)}", add_help=False)
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments of that benchmark (see --help)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name])
    return int(module.main(args.args) or 0)
