"""vLLM offline peer: prefill and decode throughput of vLLM's ``LLM`` on token-id prompts.

A standalone script for the peer venv (``.venv-vllm/bin/python vllm_offline.py --model DIR``);
it never imports ``infinite_llm``, which that venv does not have. One JSON object goes to
stdout, every log line (vLLM's and its engine process's included) to stderr.

Methodology, shared with ``infinite-llm bench engine``, for each batch size B:
  * one warm-up ``generate`` (largest batch, 2 tokens) before any measurement;
  * t_prefill = wall time of ``generate`` over the B prompts with max_tokens=1;
  * one run of the same prompts to max_tokens=N through the engine's ``step()`` loop (what
    ``generate`` runs), every step timed: ``steps`` = [seconds since the run started, requests
    that got a token in it, of which first tokens] per step, from which the caller takes the
    decode rate (its full-batch decode steps: ``bench/engine_timing.py``'s ``decode_rate``).
Greedy (temperature 0), ``ignore_eos``, no detokenization, prefix caching off (otherwise the
second run over the same prompts, and every batch after the first, would skip its prefill).

Prompts: ``--prompts-file`` (JSON list of token-id lists; batch B takes the first B), else
``numpy.random.default_rng(seed).integers(100, vocab_size - 100, size=(max(B), prompt_len))``
with ``vocab_size`` from the model's config.json, batch B taking the first B rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

GiB = 1 << 30


def make_prompts(vocab_size: int, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """The default prompts: seeded uniform token ids, clear of the special ids at both ends."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab_size - 100, size=(num_prompts, prompt_len)).tolist()


class PeakRss:
    """Samples the RSS of this process and its descendants (vLLM's engine core runs in a child).

    The sum counts pages shared between processes once per process, so it is an upper bound.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that exited since the listing
                total += proc.memory_info().rss
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory (config.json + weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts-file", help="JSON list of token-id lists (overrides --prompt-len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    p.add_argument("--max-num-batched-tokens", type=int, help="vLLM's default if not given")
    p.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (default: enforce_eager, no compile time)",
    )
    return p.parse_args(argv)


def load_prompts(args: argparse.Namespace) -> list[list[int]]:
    num_prompts = max(args.batch_sizes)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [[int(t) for t in p] for p in json.load(f)]
        if len(prompts) < num_prompts:
            raise SystemExit(f"{args.prompts_file} has {len(prompts)} prompts, need {num_prompts}")
        return prompts[:num_prompts]
    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = int(json.load(f)["vocab_size"])
    return make_prompts(vocab_size, num_prompts, args.prompt_len, args.seed)


def make_engine(args: argparse.Namespace) -> Any:
    """vLLM's offline ``LLM`` with the settings every run of this workload shares."""
    from vllm import LLM

    engine_kwargs: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": max(256, *args.batch_sizes),  # vLLM's usual default, or the largest batch
        "seed": args.seed,
        "enforce_eager": not args.compile,
        "enable_prefix_caching": False,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * GiB),
    }
    if args.max_num_batched_tokens:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return LLM(**engine_kwargs)


def generate(llm: Any, batch: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall time of one greedy ``generate`` over ``batch``, and the token ids it produced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
    )
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def stepped(
    llm: Any, batch: list[list[int]], max_tokens: int
) -> tuple[float, list[list[float]], list[list[int]]]:
    """One greedy run over ``batch`` through ``llm_engine.step()``: wall time, the steps (see the
    module docstring) and the token ids produced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
    )
    engine = llm.llm_engine
    ids = [f"stepped-{time.monotonic_ns()}-{i}" for i in range(len(batch))]
    for request_id, prompt in zip(ids, batch):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    lengths: dict[str, int] = {}
    steps: list[list[float]] = []
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        t = time.perf_counter() - start
        new = first = 0
        for out in outputs:
            n, before = len(out.outputs[0].token_ids), lengths.get(out.request_id, 0)
            if n > before:
                new, first = new + 1, first + (before == 0)
            lengths[out.request_id] = n
            if out.finished:  # cumulative outputs: copy the ids once, not at every step
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        steps.append([t, new, first])
    return time.perf_counter() - start, steps, [tokens[i] for i in ids]


def measure(llm: Any, batch: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Prefill time of one batch (a generate of 1 token) and one stepped run of ``max_tokens``."""
    t_prefill = generate(llm, batch, 1)[0]
    t_total, steps, token_ids = stepped(llm, batch, max_tokens)
    num_prompt_tokens = sum(len(p) for p in batch)
    return {
        "batch_size": len(batch),
        "num_prompt_tokens": num_prompt_tokens,
        "max_tokens": max_tokens,
        "t_prefill_s": t_prefill,
        "t_total_s": t_total,
        "prefill_tok_s": num_prompt_tokens / t_prefill,
        "steps": steps,
        "token_ids": token_ids,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the engine, warm it up, measure every batch size; the JSON report as a dict."""
    import torch
    import vllm

    prompts = load_prompts(args)
    loadavg_before = os.getloadavg()
    rss = PeakRss()
    start = time.perf_counter()
    llm = make_engine(args)
    load_s = time.perf_counter() - start
    print(f"vllm_offline: engine ready in {load_s:.1f}s", file=sys.stderr)
    warmup_s, _ = generate(llm, prompts, 2)
    results = []
    for batch_size in args.batch_sizes:
        result = measure(llm, prompts[:batch_size], args.max_tokens)
        results.append(result)
        print(
            f"vllm_offline: B={batch_size} prefill {result['prefill_tok_s']:.0f} tok/s "
            f"({result['t_prefill_s']:.2f}s), total {result['t_total_s']:.2f}s",
            file=sys.stderr,
        )

    config = llm.llm_engine.vllm_config
    return {
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "enforce_eager": not args.compile,
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "max_model_len": args.max_model_len,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "kv_cache_bytes": config.cache_config.kv_cache_memory_bytes,
        "cpu_env": {
            k: os.environ.get(k)
            for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "LD_PRELOAD")
        },
        "seed": args.seed,
        "prompts": args.prompts_file or f"seeded-uniform, prompt_len={args.prompt_len}",
        "load_s": load_s,
        "warmup_s": warmup_s,
        "results": results,
        "peak_rss_bytes": rss.stop(),
        # Other work on the machine skews every figure: a 1-minute load above the engine's own
        # threads means the numbers are not to be trusted.
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
    }


def _drop_script_dir_from_path() -> None:
    # Run as a script, this file's folder comes first on sys.path, and there `import vllm` would
    # find our own peers/vllm.py helper instead of vLLM. Spawned engine processes inherit the fix.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _drop_script_dir_from_path()
    # vLLM logs to stdout, and so does its engine process (it inherits fd 1): point fd 1 at
    # stderr for the whole run and keep a private copy of the real stdout for the JSON.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report = run(args)
    json.dump(report, json_out)
    json_out.write("\n")
    json_out.flush()
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn
    sys.exit(main())
