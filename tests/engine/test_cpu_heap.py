"""A SmolLM2 prefill reuses freed heap pages (``engine.cpu_heap``): page faults per forward,
counted by the kernel, with the thresholds raised and with glibc's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource
from infinite_llm import LLM, SamplingParams
llm = LLM("smollm2", num_instances=1, enable_prefix_caching=False, progress=False)
prompts = [[1000 + (7 * i + j) % 20000 for j in range(256)] for i in range(4)]
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
llm.generate(prompts, params, use_tqdm=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    llm.generate(prompts, params, use_tqdm=False)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults(keep: str) -> int:
    env = {**os.environ, "INFINITE_LLM_KEEP_FREED_MEMORY": keep}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_reuses_freed_pages() -> None:
    kept, default = faults("1"), faults("0")
    # With the thresholds raised, the forwards reuse freed pages: usually next to none are
    # fresh (0-900), on a loaded machine a few thousand (1,721 and 4,607 seen in full-suite
    # runs: about one activation tensor's worth). With glibc's own, usually tens of thousands
    # (40,000-87,227 measured), though its dynamic mmap threshold sometimes adapts during the
    # warm-up and then it reads 0 too: only the first figure is held to a bound.
    assert kept < 10_000, (kept, default)
