"""``infinite-llm export-hf MODEL DIR``: write a model as a Hugging Face directory (for vLLM and others)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf", help="write a model (e.g. smollm2) as config.json + safetensors + tokenizer"
    )
    p.add_argument("model", help="embedded name, .gguf file or tiny[:preset]")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infinite_llm.model.export import export_hf

    path = export_hf(args.model, args.out_dir, dtype=args.dtype)
    print(path)
    return 0
