"""Engine flags shared by ``generate``, ``serve`` and the benchmarks, and their ``EngineConfig``."""

from __future__ import annotations

import argparse
import re

from infinite_llm.config import BACKENDS, CacheConfig, EngineConfig
from infinite_llm.model.registry import DEFAULT_MODEL
from infinite_llm.scheduler.scheduler import SchedulerConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1.5g', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2G, 512M, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded name (smollm2), a .gguf file, a Hugging Face directory, or tiny[:preset]",
    )
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument(
        "--num-instances", type=int, default=1, help="instances, each with its own KV pool"
    )
    g.add_argument("--backend", default="inprocess", choices=BACKENDS)
    g.add_argument(
        "--ray-address",
        default=None,
        help="with --backend ray: join this Ray cluster (default: start a local one)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per rBlock")
    g.add_argument("--kv-blocks", type=int, default=None, help="rBlocks per instance")
    g.add_argument(
        "--kv-memory", type=parse_bytes, default=None, help="KV memory per instance (e.g. 2G)"
    )
    g.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + output, in tokens"
    )
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget of one step"
    )
    g.add_argument("--max-num-seqs", type=int, default=128, help="running requests per instance")
    g.add_argument(
        "--memory-instances",
        type=int,
        default=0,
        help="instances that hold rBlocks for the others and run their MicroAttention, "
        "without the model's weights (never home a request)",
    )
    g.add_argument(
        "--memory-instance-kv-memory",
        type=parse_bytes,
        default=None,
        help="KV memory per memory instance (e.g. 8G; default: a model instance's)",
    )
    g.add_argument(
        "--host-kv-memory",
        type=parse_bytes,
        default=None,
        help="a second KV pool per instance in its host's memory (e.g. 16G), its "
        "MicroAttention on the host's cores: the host tier",
    )
    g.add_argument(
        "--no-borrow",
        action="store_true",
        help="baseline: a request's KV stays on its home instance (no lending or borrowing)",
    )
    g.add_argument(
        "--lending-cap",
        type=float,
        default=1.0,
        help="largest share of a pool lent to other instances at once (1.0: any free rBlock)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of prompts' cached prefixes, wherever in the cluster they are "
        "(default: on; --no-enable-prefix-caching computes every prompt whole)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs a request may ask for per token (-1: the whole vocabulary)",
    )
    g.add_argument(
        "--attention-impl",
        default="auto",
        help="auto, flash, reference, native (when built) or triton (CUDA)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        num_instances=args.num_instances,
        backend=args.backend,
        ray_address=args.ray_address,
        max_model_len=args.max_model_len,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        attention_impl=args.attention_impl,
        num_memory_instances=args.memory_instances,
        kv_memory_per_memory_instance=args.memory_instance_kv_memory,
        host_kv_memory=args.host_kv_memory,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.kv_blocks,
            memory_bytes=args.kv_memory,
            lending_cap=args.lending_cap,
            enable_borrowing=not args.no_borrow,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs
        ),
    )
