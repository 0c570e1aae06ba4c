"""A prefill step's attention on this machine: torch's CPU flash kernel (one call per request)
against the native prefill kernel (``attention/cpu_prefill.py``), SmolLM2's heads (9 query, 3
KV, head dim 64), 2 threads, median ms of 15 calls and GFLOP/s, as JSON:

* ``self``: the causal self part through ``causal_self_attention`` as the model calls it (q, k,
  v strided views of one fused projection; flash repeats the KV heads for their groups);
* ``context``: query chunks over their context in a pool's rBlocks (block size 16, shuffled or
  in one run) through ``micro_attention``, against ``micro_attention_flash``.

    .venv/bin/python scripts/prefill_attention_speed.py
"""

from __future__ import annotations

import json
import random
import statistics
import time
from functools import partial

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import causal_self_attention, micro_attention_flash
from infinite_llm.attention.micro import micro_attention

HQ, HKV, D = 9, 3, 64
BATCHES = {
    "4x256": [256] * 4,
    "4x512": [512] * 4,
    "1x2048": [2048],
    "4x128": [128] * 4,
    "8x16": [16] * 8,
}


# (requests, query tokens, context tokens, shuffled blocks)
CONTEXTS = {
    "4x64 over 2000, shuffled": (4, 64, 2000, True),
    "4x64 over 2000, one run": (4, 64, 2000, False),
    "1x16 over 2032, shuffled": (1, 16, 2032, True),
    "4x128 over 256, shuffled": (4, 128, 256, True),
}
BS = 16


def median_ms(call) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def row(flops: float, flash, native) -> dict:
    out = {}
    for label, call in (("torch_flash", flash), ("native", native)):
        ms = median_ms(call)
        out[label] = {"ms": round(ms, 3), "gflop_s": round(flops / ms / 1e6, 1)}
    out["speedup"] = round(out["torch_flash"]["ms"] / out["native"]["ms"], 2)
    return out


def main() -> None:
    torch.set_num_threads(2)
    result: dict[str, dict] = {"self": {}, "context": {}}
    scale = D**-0.5
    for name, lens in BATCHES.items():
        qkv = torch.randn(sum(lens), HQ + 2 * HKV, D)
        q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
        flops = sum(HQ * n * (n + 1) / 2 * D * 4 for n in lens)  # QK^T and PV, causal half
        result["self"][name] = row(
            flops,
            partial(causal_self_attention, q, k, v, lens, scale, torch.float32, "flash"),
            partial(causal_self_attention, q, k, v, lens, scale, torch.float32, "auto"),
        )
        print("self", name, result["self"][name], flush=True)
    for name, (n, qlen, ctx, shuffled) in CONTEXTS.items():
        per = -(-ctx // BS)
        ids = list(range(per * n))
        if shuffled:
            random.Random(0).shuffle(ids)
        batch = MABatch([qlen] * n, [ids[i * per : (i + 1) * per] for i in range(n)], [ctx] * n, BS)
        kc, vc = torch.randn(HKV, per * n, BS, D), torch.randn(HKV, per * n, BS, D)
        q = torch.randn(n * qlen, HQ, D)
        result["context"][name] = row(
            n * qlen * HQ * ctx * D * 4,
            partial(micro_attention_flash, q, kc, vc, batch, scale),
            partial(micro_attention, q, kc, vc, batch, scale),
        )
        print("context", name, result["context"][name], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
