"""End to end on the embedded SmolLM2-135M GGUF, against transformers' own GGUF loader."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import hf_greedy_with, loaded_model
from infinite_llm import LLM, SamplingParams
from infinite_llm.model.registry import resolve_model

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


@pytest.fixture(scope="module")
def reference():
    """transformers reading the GGUF itself: independent of our dequantization and unpermuting."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2").path
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def test_weights_equal_transformers_gguf_loader(reference) -> None:
    _, ref = reference
    model = loaded_model("smollm2").model
    ours = dict(model.named_parameters(remove_duplicate=False))
    ref_sd = ref.state_dict()
    layer = 7
    proj = model.layers[layer].qkv_proj
    qkv = proj.dense_weight() if hasattr(proj, "dense_weight") else proj.weight
    expect = torch.cat([ref_sd[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expect)
    assert torch.equal(model.embed_tokens.weight, ref_sd["model.embed_tokens.weight"])
    assert torch.equal(ours["norm.weight"], ref_sd["model.norm.weight"])


@torch.inference_mode()
def test_chat_greedy_32_tokens_match_transformers(reference) -> None:
    tok, ref = reference
    llm = LLM(
        "smollm2", loaded_model=loaded_model("smollm2"), kv_blocks_per_instance=256, progress=False
    )
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.chat(CHATS, params, use_tqdm=False)
    for chat, out in zip(CHATS, outs):
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()  # same tokenizer and chat template
        assert out.outputs[0].token_ids == hf_greedy_with(ref, ids[0].tolist(), 32)
    assert "Paris" in outs[0].outputs[0].text
    llm.check_integrity()


def test_tokenizer_round_trip_and_eos() -> None:
    tok = loaded_model("smollm2").tokenizer
    text = "Infinite-LLM pools KV memory — across instances! 你好"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2 and tok.has_chat_template


@torch.inference_mode()
def test_questions_about_a_shared_document_reuse_its_cached_prefix_exactly(reference) -> None:
    # Two instances: the first question computes the document on instance 0; the second, homed
    # on instance 1, attends those rBlocks in place; the third asks on instance 0 again.
    tok, ref = reference
    llm = LLM(
        "smollm2",
        loaded_model=loaded_model("smollm2"),
        num_instances=2,
        kv_blocks_per_instance=128,
        progress=False,
    )
    engine = llm.engine
    doc = "The history of the lighthouse: " + " ".join(
        f"In year {1800 + i} the keeper wrote entry number {i} about the weather and ships."
        for i in range(24)
    )
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for home, question in enumerate(["Who kept it?", "What did they write?", "When?"]):
        prompt = tok(f"{doc}\nQuestion: {question}\nAnswer:")["input_ids"]
        request = engine.make_request(prompt, params)
        engine.add_request(request, home=home % 2)
        out = None
        while out is None:
            out = next((o for o in engine.step() if o.finished), None)
        engine.cluster.core.heartbeat(force=True)
        want = hf_greedy_with(ref, prompt, 16)
        assert out.outputs[0].token_ids == want
        assert (out.num_cached_tokens > 300) == (home > 0), out.num_cached_tokens
    llm.check_integrity()
