"""What splitting one decode MA over two processes costs on this machine, with nothing else
running: the floor under ``bench distributed``'s spread steps.

One request with SmolLM2's heads (9 query, 3 KV, head dim 64); the KV of 30 layers, cycled,
so it streams from memory as in a step. Prints JSON, medians in ms:

* one process, 2 threads, a 4,096-token context (the all-local MA);
* one process, 1 thread, 2,048 tokens, alone;
* two processes, 1 thread each, 2,048 tokens each, at once (the two shares of a spread MA).

    .venv/bin/python scripts/ma_split_floor.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

LAYERS, HKV, HQ, D, BS = 30, 3, 9, 64, 16
ITERS = 3000


def median_ms(ctx: int, threads: int, barrier=None, out=None) -> float:
    import torch

    from infinite_llm.attention import cpu_native
    from infinite_llm.attention.batch import MABatch

    torch.set_num_threads(threads)
    nb = ctx // BS
    k = torch.randn(LAYERS, HKV, nb, BS, D)
    v = torch.randn(LAYERS, HKV, nb, BS, D)
    batch = MABatch([1], [list(range(nb))], [ctx], BS)
    q = torch.randn(1, HQ, D)
    for layer in range(LAYERS):  # warm: the call is prepared once per batch
        cpu_native.micro_attention_native(q, k[layer], v[layer], batch, D**-0.5)
    if barrier is not None:
        barrier.wait()
    times = []
    for i in range(ITERS):
        begin = time.perf_counter()
        cpu_native.micro_attention_native(q, k[i % LAYERS], v[i % LAYERS], batch, D**-0.5)
        times.append(time.perf_counter() - begin)
    result = statistics.median(times) * 1e3
    if out is not None:
        out.put(result)
    return result


def main() -> None:
    mp.set_start_method("spawn")
    report = {
        "one_process_2_threads_4096_ms": median_ms(4096, 2),
        "one_process_1_thread_2048_ms": median_ms(2048, 1),
    }
    barrier, out = mp.Barrier(2), mp.Queue()
    procs = [mp.Process(target=median_ms, args=(2048, 1, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    report["two_processes_1_thread_2048_at_once_ms"] = sorted(out.get(timeout=5) for _ in procs)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
