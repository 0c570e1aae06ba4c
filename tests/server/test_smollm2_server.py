"""End to end on the embedded SmolLM2 with ``make serve``'s defaults (2 instances, pools sized
from free memory): the chat answer equals the offline answer of ``infinite-llm generate --chat``
(``LLM.chat``), streamed or not."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from .helpers import REPO_ROOT, ServerProcess, wait_clean

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


def test_default_serve_answers_like_offline_chat(smollm2_server: ServerProcess) -> None:
    # The offline reference runs in its own process while the server answers.
    offline = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infinite_llm.cli.main",
            "generate",
            "--chat",
            "--json",
            "--temperature",
            "0",
            "--max-tokens",
            str(MAX_TOKENS),
            "--kv-blocks",
            "64",
            QUESTION,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    log = smollm2_server.output()
    assert (
        "infinite-llm serving smollm2" in log
        and "2 instance(s)" in log
        and "curl http://127.0.0.1:" in log
    )
    client = openai.OpenAI(
        base_url=smollm2_server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120
    )
    (model,) = client.models.list().data
    assert model.id == "smollm2"
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    streamed = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    snap = wait_clean(smollm2_server.base_url)
    assert len(snap["instances"]) == 2 and snap["block_size"] == 16
    out, err = offline.communicate(timeout=300)
    assert offline.returncode == 0, err[-2000:]
    expected = json.loads(out.strip().splitlines()[-1])
    assert reply.choices[0].message.content == expected["text"] == streamed_text
    assert reply.choices[0].finish_reason == expected["finish_reason"]
    assert "Paris" in expected["text"]
