"""The engine on the Triton attention kernel gives Hugging Face transformers' greedy tokens.

No GPU here: the engine runs on CPU with ``attention_impl="triton"`` under Triton's interpreter,
in a child process (``TRITON_INTERPRET=1`` must be set before triton is imported). Small pools,
a small token budget and several prompts make every kind of MA call happen: decode rows, later
prefill chunks over their cached blocks, and both in one batch; the causal self part of each
prefill chunk runs on the same Triton kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import infinite_llm
from conftest import hf_greedy, loaded_model, random_prompts

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

NEW_TOKENS = 6

CHILD = """
import json, sys
from infinite_llm import LLM, SamplingParams
from infinite_llm.attention import cpu_flash, triton_paged
from infinite_llm.model.loader import load_model

calls, self_calls = [], []
kernel = triton_paged.paged_attention
def counted(q, *args):
    calls.append(q.shape[0])
    return kernel(q, *args)
triton_paged.paged_attention = counted  # micro_attention looks it up on each call

# The step's causal self part: DistAttention passes the executor's impl, so it is the Triton
# kernel's too (as "auto" picks it on CUDA).
self_kernel = triton_paged.causal_self_attention_triton
def self_part(q, k, v, query_lens, *args):
    self_calls.append(len(query_lens))
    return self_kernel(q, k, v, query_lens, *args)
triton_paged.causal_self_attention_triton = self_part

prompts, new_tokens = json.loads(sys.argv[1]), int(sys.argv[2])
llm = LLM(
    "tiny",
    loaded_model=load_model("tiny", "float32", progress=False),
    attention_impl="triton",
    block_size=4,
    kv_blocks_per_instance=64,
    max_num_batched_tokens=12,
    progress=False,
)
params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
outs = llm.generate(prompts, params, use_tqdm=False)
llm.check_integrity()
tokens = [o.outputs[0].token_ids for o in outs]
print(json.dumps({"tokens": tokens, "calls": calls, "self_calls": self_calls}))
"""


def test_greedy_tokens_match_transformers_on_the_triton_kernel() -> None:
    prompts = random_prompts(3, (5, 21), 256, seed=4)
    src = os.path.dirname(os.path.dirname(infinite_llm.__file__))  # the code under test
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(prompts), str(NEW_TOKENS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the kernel really ran: 2 layers per step, single decode rows and longer chunks among them
    assert len(result["calls"]) >= 2 * NEW_TOKENS
    assert 1 in result["calls"] and max(result["calls"]) > len(prompts)
    assert result["self_calls"]
    model_dir = loaded_model("tiny").model_dir
    assert result["tokens"] == [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
