"""The self part of a prefill step's attention on this machine: torch's CPU flash kernel (one
call per request, KV heads repeated for their groups) against the native kernel
(``attention/cpu_prefill.py``), through ``causal_self_attention`` as the model calls it: q, k, v
strided views of one fused projection, SmolLM2's heads (9 query, 3 KV, head dim 64), 2 threads.
Prints JSON: per batch, median ms of 15 calls and the causal GFLOP/s.

    .venv/bin/python scripts/prefill_attention_speed.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from infinite_llm.attention.cpu_flash import causal_self_attention

HQ, HKV, D = 9, 3, 64
BATCHES = {
    "4x256": [256] * 4,
    "4x512": [512] * 4,
    "1x2048": [2048],
    "4x128": [128] * 4,
    "8x16": [16] * 8,
}


def median_ms(q, k, v, lens, impl: str) -> float:
    for _ in range(2):
        causal_self_attention(q, k, v, lens, D**-0.5, torch.float32, impl)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        causal_self_attention(q, k, v, lens, D**-0.5, torch.float32, impl)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    result = {}
    for name, lens in BATCHES.items():
        qkv = torch.randn(sum(lens), HQ + 2 * HKV, D)
        q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
        flops = sum(HQ * n * (n + 1) / 2 * D * 4 for n in lens)  # QK^T and PV, causal half
        row = {}
        for impl, label in (("flash", "torch_flash"), ("auto", "native")):
            ms = median_ms(q, k, v, lens, impl)
            row[label] = {"ms": round(ms, 3), "gflop_s": round(flops / ms / 1e6, 1)}
        row["speedup"] = round(row["torch_flash"]["ms"] / row["native"]["ms"], 2)
        result[name] = row
        print(name, row, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
