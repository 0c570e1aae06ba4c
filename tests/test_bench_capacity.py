"""``bench capacity``: the longest context served, to completion, with one token more refused;
with memory instances and host pools, what every pool together holds."""

from __future__ import annotations

import json

from infinite_llm.bench import capacity


def test_memory_instances_and_host_pools_serve_what_the_pooled_memory_holds(capsys) -> None:
    argv = ["--instances", "1", "2", "--kv-blocks", "16", "--memory-instances", "3"]
    argv += ["--host-kv-blocks", "8", "--output-tokens", "4", "--json"]
    assert capacity.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [run["instances"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        n = run["instances"]
        ours, base = run["borrowing"], run["no_borrow"]
        assert ours["pooled_tokens"] == (n * 16 + 3 * 16 + n * 8) * 16
        assert run["served_over_pooled"] >= 0.95
        assert base["served_tokens"] == 16 * 16  # the home pool alone
        assert ours["one_more_refused"] and base["one_more_refused"]
        assert ours["all_free_after"] and ours["finish_reason"] == "length"
