"""The ``infinite-llm`` command line: generate, serve, bench, simulate, export-hf."""

from __future__ import annotations

import argparse
import logging
import sys

from infinite_llm.cli import bench, export, generate, serve, simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinite-llm", description="LLM serving with a KV cache pooled across instances"
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    bench.add_parser(sub)
    export.add_parser(sub)
    serve.add_parser(sub)
    simulate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
