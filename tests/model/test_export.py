"""export_hf: the exported HF directory reloads in transformers with the GGUF model's logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infinite_llm.model.export import export_hf

pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_export_smollm2_round_trip(tmp_path: Path) -> None:
    from infinite_llm.model.registry import ModelNotFoundError, resolve_model

    try:
        gguf_path = resolve_model("smollm2").path
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    assert gguf_path is not None
    out_dir = export_hf("smollm2", str(tmp_path / "smollm2-hf"))

    names = set(os.listdir(out_dir))
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {"generation_config.json"} <= names
    with open(os.path.join(out_dir, "config.json")) as f:
        assert "quantization_config" not in json.load(f)

    gguf_dir, gguf_file = os.path.split(gguf_path)
    auto_model = transformers.AutoModelForCausalLM
    auto_tok = transformers.AutoTokenizer
    reference = auto_model.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype="float32")
    ref_tok = auto_tok.from_pretrained(gguf_dir, gguf_file=gguf_file)
    exported = auto_model.from_pretrained(out_dir)
    tok = auto_tok.from_pretrained(out_dir)
    assert exported.dtype == torch.float32

    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        expected_logits = reference(ids).logits
        got_logits = exported(ids).logits
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-5, rtol=0)

    messages = [{"role": "user", "content": "Hi"}]
    assert tok.chat_template
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ref_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == ref_tok.eos_token == "<|im_end|>"
