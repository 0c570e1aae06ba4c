"""Incremental detokenization: deltas never split a multi-byte character and add up to the text."""

from __future__ import annotations

from conftest import loaded_model
from infinite_llm.engine.detokenizer import IncrementalDetokenizer
from infinite_llm.sampling_params import SamplingParams


def test_multibyte_characters_are_never_split() -> None:
    tok = loaded_model("tiny").tokenizer  # byte-level: one token per byte
    text = "naïve café — 你好, мир! 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())
    detok = IncrementalDetokenizer(tok, [65, 66], SamplingParams())
    deltas = []
    for token in ids:
        before = detok.text
        detok.add_token(token)
        deltas.append(detok.text[len(before) :])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) == len(text)  # one delta per character, never half of one


def test_unfinished_utf8_is_flushed_as_replacement_at_the_end() -> None:
    tok = loaded_model("tiny").tokenizer
    ids = [*tok.encode("ab", add_special_tokens=False), 0xE4, 0xBD]  # first 2 of 3 bytes of 你
    detok = IncrementalDetokenizer(tok, [65], SamplingParams())
    for token in ids:
        detok.add_token(token)
    assert detok.text == "ab"  # held back while the character may still complete
    detok.flush(ids)
    assert detok.text == tok.decode(ids) and detok.text.startswith("ab") and "\ufffd" in detok.text


def test_stop_string_split_across_tokens_is_held_back() -> None:
    tok = loaded_model("tiny").tokenizer
    detok = IncrementalDetokenizer(tok, [65], SamplingParams(stop=["STOP"]))
    for token in tok.encode("abcST", add_special_tokens=False):
        detok.add_token(token)
    assert (
        detok.stop_string is None and detok.stable_length(finished=False) == 2
    )  # "ST" might start "STOP"
    for token in tok.encode("OPxyz", add_special_tokens=False):
        detok.add_token(token)
    assert detok.stop_string == "STOP" and detok.text == "abc"
