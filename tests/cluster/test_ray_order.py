"""The cluster-wide order on Ray, where the actors step concurrently: two requests longer than
their home pools, admitted in the same round on different actors, must not prefill side by side
(the gManager's prefill claim decides between them)."""

from __future__ import annotations

import pytest

from cluster.helpers import assert_all_free, run
from conftest import hf_greedy, loaded_model, random_prompts

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_two_prompts_longer_than_their_pools_added_at_once_prefill_one_at_a_time(
    ray_engine,
) -> None:
    # 3 actors x 12 blocks x 8 tokens = 96 tokens per pool; each prompt (120 tokens, 144 with
    # its output) must borrow. Both are queued before the first step, on actors 0 and 1, which
    # step concurrently: the last step's reports say nothing of either, so only the gManager's
    # claim keeps the second out while the first prefills.
    engine = ray_engine(num_instances=3, num_blocks=12, block_size=8, budget=32)
    prompts = random_prompts(2, (120, 120), 256, seed=23)
    holders: list[list[int]] = []

    def after_step(e, step: int) -> None:
        if step == 1:
            holders.append(
                [
                    snap.instance_id
                    for snap in e.cluster.snapshots()
                    if any(refs for refs in snap.block_tables.values())
                ]
            )

    got = run(engine, prompts, homes=[0, 1], timeout_s=240, on_step=after_step)
    assert len(holders) == 1 and len(holders[0]) <= 1, f"both admitted at once: {holders}"
    assert got == [hf_greedy(loaded_model("tiny").model_dir, p, 24) for p in prompts]
    assert_all_free(engine)
