"""Grammar-constrained sampling: batched masks, exact greedy among allowed tokens, matchers that
stay consistent across preemption and process hops, the grammar cache, and through the LLM."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest
import torch

from cluster.helpers import assert_all_free, make_engine, run
from conftest import loaded_model
from infinite_llm import LLM
from infinite_llm.engine.sampler import make_generator, sample
from infinite_llm.engine.structured import RequestGrammar, StructuredOutputs
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request
from infinite_llm.structured_outputs import StructuredOutputsParams as S

VOCAB = 320  # the tiny model's byte-level vocabulary: token b < 256 is byte b


@pytest.fixture(scope="module")
def structured() -> StructuredOutputs:
    return StructuredOutputs(lambda: loaded_model("tiny").tokenizer.hf, VOCAB)


def request(i: int, params: SamplingParams, output: list[int] | None = None) -> Request:
    r = Request(f"r{i}", [1, 2, 3], params, max_tokens=64, eos_token_id=257)
    r.output_token_ids = list(output or [])
    if not params.greedy:
        r.generator = make_generator(100 + i)
    return r


def test_params_refuse_bad_constraints_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"structured_outputs\.json: Invalid type"):
        S(json={"type": "foo"})
    with pytest.raises(ValueError, match=r"structured_outputs\.json: not valid JSON"):
        S(json="{nope")
    with pytest.raises(ValueError, match=r"(?s)structured_outputs\.regex: .*unclosed group"):
        S(regex="a(b")
    with pytest.raises(ValueError, match=r"structured_outputs\.choice"):
        S(choice=[])
    with pytest.raises(ValueError, match=r"(?s)structured_outputs\.grammar: .*unknown name"):
        S(grammar="start: foo")
    with pytest.raises(ValueError, match=r"exactly one of .*\(got regex, choice\)"):
        S(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="got none"):
        S()
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]
    assert S(grammar='root ::= "yes" | "no"').kind == "grammar"  # GBNF is converted to Lark


def test_greedy_is_the_argmax_among_allowed_tokens(structured: StructuredOutputs) -> None:
    # choice: "yes" or "no". The model prefers "x" by far, then "n" over "y".
    logits = torch.zeros(1, VOCAB)
    logits[0, ord("x")] = 10.0
    logits[0, ord("n")] = 2.0
    logits[0, ord("y")] = 1.0
    r = request(0, SamplingParams(temperature=0, structured_outputs=S(choice=["yes", "no"])))
    (token,) = sample(logits.clone(), [r], structured)
    assert token.token_id == ord("n")
    structured.accept([r], [token.token_id])
    r.output_token_ids.append(token.token_id)
    # now only "o" is allowed, whatever the model prefers
    (token,) = sample(logits.clone(), [r], structured)
    assert token.token_id == ord("o")
    structured.accept([r], [ord("o")])
    r.output_token_ids.append(ord("o"))
    (token,) = sample(logits.clone(), [r], structured)
    assert token.token_id == 257  # the grammar is complete: EOS only


def test_masks_are_batched_and_free_rows_are_untouched(structured: StructuredOutputs) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    kinds = [None, S(regex=r"[0-9]+"), None, S(choice=["alpha", "beta"]), None, S(regex="z+")]
    rows = [
        request(i, SamplingParams(temperature=0 if i % 2 else 0.8, structured_outputs=k))
        for i, k in enumerate(kinds)
    ]
    free = [i for i, k in enumerate(kinds) if k is None]
    reference = sample(logits[free].clone(), [request(i, rows[i].sampling_params) for i in free])
    got = sample(logits.clone(), rows, structured)
    assert [got[i] for i in free] == reference
    assert chr(got[1].token_id).isdigit()
    assert got[3].token_id in (ord("a"), ord("b"))
    assert got[5].token_id == ord("z")
    # every constrained row is the argmax of its allowed tokens (the greedy ones)
    digits = logits[1, ord("0") : ord("9") + 1]
    assert got[1].token_id == ord("0") + int(digits.argmax())


def test_all_rows_constrained_and_logprobs_are_over_allowed_tokens(structured):
    logits = torch.randn(2, VOCAB)
    rows = [
        request(i, SamplingParams(temperature=0, logprobs=2, structured_outputs=S(regex="[ab]")))
        for i in range(2)
    ]
    for token in sample(logits.clone(), rows, structured):
        assert token.token_id in (ord("a"), ord("b"))
        assert set(token.top_logprobs) == {ord("a"), ord("b")}


def test_min_tokens_against_a_complete_grammar_keeps_the_grammar(structured) -> None:
    # "n","o" done: the grammar allows only EOS, which min_tokens forbids: the grammar wins
    params = SamplingParams(temperature=0.7, min_tokens=5, structured_outputs=S(choice=["no"]))
    r = request(0, params, output=[ord("n"), ord("o")])
    (token,) = sample(torch.randn(1, VOCAB), [r], structured)
    assert token.token_id == 257


def test_matcher_replays_the_output_after_a_process_hop(structured: StructuredOutputs) -> None:
    params = SamplingParams(temperature=0, structured_outputs=S(choice=["yes", "yellow"]))
    r = request(0, params, output=[ord("y"), ord("e")])
    logits = torch.zeros(1, VOCAB)
    logits[0, ord("s")] = 1.0
    (token,) = sample(logits.clone(), [r], structured)  # a fresh matcher, caught up on "ye"
    assert token.token_id == ord("s") and r.structured.num_consumed == 2
    copy = pickle.loads(pickle.dumps(r.structured))  # what a Ray actor would receive
    assert isinstance(copy, RequestGrammar) and copy.matcher is None
    r.structured = copy
    (token,) = sample(logits.clone(), [r], structured)
    assert token.token_id == ord("s")


def test_grammars_are_compiled_once_per_spec_lru() -> None:
    cache = StructuredOutputs(lambda: loaded_model("tiny").tokenizer.hf, VOCAB, cache_size=2)
    specs = [S(regex=f"a{{{n}}}").grammar_spec for n in (1, 2, 3)]
    first = cache.compile(specs[0])
    assert cache.compile(specs[0]) is not first and cache.num_cached == 1  # copies of one
    cache.compile(specs[1])
    cache.compile(specs[0])  # most recent now
    cache.compile(specs[2])  # evicts specs[1]
    assert list(cache._templates) == [specs[0], specs[2]]


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["s", "m", "l"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "size", "count"],
}


def test_llm_generates_what_the_constraints_allow() -> None:
    llm = LLM("tiny", num_instances=2)
    cases = [
        S(json=SCHEMA),
        S(regex=r"[a-c]{2,4}-[0-9]{2}"),
        S(choice=["red", "green", "blue"]),
        S(grammar='start: "(" ("x" | "y")+ ")"'),
    ]
    plist = [
        SamplingParams(temperature=t, seed=3, max_tokens=80, structured_outputs=c)
        for t in (0.0, 1.0)
        for c in cases
    ]
    prompts = ["hello"] * len(plist)
    outs = [o.outputs[0] for o in llm.generate(prompts, plist, use_tqdm=False)]
    for i, out in enumerate(outs):
        kind = i % len(cases)
        assert out.finish_reason == "stop", out.text
        if kind == 0:
            jsonschema.validate(json.loads(out.text), SCHEMA)
        elif kind == 1:
            assert re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", out.text)
        elif kind == 2:
            assert out.text in ("red", "green", "blue")
        else:
            assert re.fullmatch(r"\([xy]+\)", out.text)


def test_preempted_requests_keep_their_grammar() -> None:
    # Pools of 2 x 16 rBlocks of 4 tokens, no borrowing: four 20-token prompts generating 31
    # tokens each (13 rBlocks) cannot all fit, so some are preempted and recomputed mid-output.
    engine = make_engine(num_instances=2, num_blocks=16, block_size=4, borrowing=False)
    regex = r"[a-z]{30}"
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=S(regex=regex))
    prompts = [[10 + i] * 20 for i in range(4)]
    got = run(engine, prompts, params)
    assert sum(i["preemptions"] for i in engine.cluster.stats()["instances"]) > 0
    alone = make_engine(num_instances=1, num_blocks=64, block_size=4)
    assert got == run(alone, prompts, params)
    for ids in got:
        assert re.fullmatch(regex, bytes(ids[:-1]).decode()) and ids[-1] == 257
    assert_all_free(engine)
