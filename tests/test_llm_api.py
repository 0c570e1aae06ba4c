"""The offline API's contract: vLLM-shaped calls, and clear errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest

from conftest import loaded_model
from infinite_llm import LLM, SamplingParams
from infinite_llm.model.loader.gguf_loader import GGUFError
from infinite_llm.model.registry import ModelNotFoundError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        "tiny",
        loaded_model=loaded_model("tiny"),
        kv_blocks_per_instance=32,
        block_size=8,
        max_model_len=200,
        progress=False,
    )


def assert_clean(llm: LLM) -> None:
    llm.check_integrity()
    (inst,) = llm.cluster_stats()["instances"]
    assert inst["free"] == inst["num_blocks"] and inst["running"] == inst["waiting"] == 0


def test_generate_accepts_text_token_ids_and_lists(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    one = llm.generate("hello", params, use_tqdm=False)
    ids = llm.generate([104, 101, 108, 108, 111], params, use_tqdm=False)
    both = llm.generate(["hello", [104, 101, 108, 108, 111]], params, use_tqdm=False)
    assert (
        one[0].outputs[0].token_ids == ids[0].outputs[0].token_ids == both[1].outputs[0].token_ids
    )
    assert one[0].prompt == "hello" and one[0].prompt_token_ids == [104, 101, 108, 108, 111]
    assert one[0].finished and one[0].outputs[0].finish_reason == "length"
    assert one[0].outputs[0].text == llm.get_tokenizer().decode(one[0].outputs[0].token_ids)
    assert_clean(llm)


def test_chat_uses_the_model_template(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    expected = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}])
    assert out[0].prompt_token_ids == expected
    # The tiny template: "<s>user: hi\n<s>assistant: ", one token per byte, 256 = <s>.
    assert expected[0] == 256 and bytes(expected[1:10]) == b"user: hi\n" and expected[10] == 256


def test_chat_renders_tools_as_the_server_does() -> None:
    """``tools=`` (vLLM's ``LLM.chat`` argument): a template that ignores tools (the tiny one)
    gets them in the Hermes style, and a template that knows tools gets them through
    ``tools``, exactly as ``/v1/chat/completions`` renders them."""
    # room for the Hermes instructions, a token per byte on the tiny model
    llm = LLM("tiny", loaded_model=loaded_model("tiny"), kv_blocks_per_instance=160, progress=False)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    (out,) = llm.chat(history, params, use_tqdm=False, tools=[tool])
    text = tokenizer.decode(out.prompt_token_ids)
    assert text.startswith("system: You are a function calling AI model.")
    assert json.dumps(tool) in text  # the signature in the <tools> block
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    (plain,) = llm.chat(history[:1], params, use_tqdm=False)
    assert "<tools>" not in tokenizer.decode(plain.prompt_token_ids)
    knows = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}"
    (own,) = llm.chat(history[:1], params, use_tqdm=False, tools=[tool], chat_template=knows)
    assert own.prompt_token_ids == [ord(c) for c in "[get_weather]Weather in Paris?"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([1, 2, 99999], "out of range"),
        ("x" * 250, "max_model_len is 200"),
    ],
)
def test_bad_prompts_are_refused_before_anything_is_allocated(
    llm: LLM, prompt, message: str
) -> None:
    good = "fine prompt"
    with pytest.raises(ValueError, match=message):
        llm.generate([good, prompt], SamplingParams(max_tokens=3), use_tqdm=False)
    assert_clean(llm)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must be at least 1"),
        ({"n": 2, "best_of": 1}, "best_of must be at least n"),
        ({"stop": [""]}, "stop strings"),
        ({"logprobs": -3}, "logprobs"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_max_tokens_is_capped_by_max_model_len(llm: LLM) -> None:
    out = llm.generate(
        [[5] * 190], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 10 and out[0].outputs[0].finish_reason == "length"
    assert_clean(llm)


def test_unknown_model_and_corrupt_gguf(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope"), progress=False)
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        LLM(str(tmp_path), progress=False)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(GGUFError, match=r"broken\.gguf"):
        LLM(str(bad), progress=False)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        LLM(str(not_gguf), progress=False)


def test_engine_config_errors() -> None:
    with pytest.raises(ValueError, match="block_size"):
        LLM("tiny", loaded_model=loaded_model("tiny"), block_size=3, progress=False)
    with pytest.raises(ValueError, match="num_instances"):
        LLM("tiny", loaded_model=loaded_model("tiny"), num_instances=0, progress=False)
    with pytest.raises(ValueError, match="holds no rBlock"):
        LLM("tiny", loaded_model=loaded_model("tiny"), kv_memory_per_instance=10, progress=False)


def test_chat_continues_the_final_message_and_takes_a_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes"}]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    (out,) = llm.chat(
        messages, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert llm.get_tokenizer().decode(out.prompt_token_ids).endswith("assistant: Yes")
    (own,) = llm.chat(
        messages[:1],
        params,
        use_tqdm=False,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tail }}",
        chat_template_kwargs={"tail": "!"},
    )
    assert own.prompt_token_ids == [ord(c) for c in "hi!"]
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(messages, params, continue_final_message=True)
