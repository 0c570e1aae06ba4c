"""``NodeCores``: a node's cores shared among the instance actors stepping on it at the moment."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from infinite_llm.cluster.ray_placement import NodeCores


def test_a_lone_step_takes_every_core_and_steps_at_once_split_them(tmp_path) -> None:
    a, b = NodeCores(str(tmp_path), 0, cores=4), NodeCores(str(tmp_path), 7, cores=4)
    assert a.begin() == 4
    assert b.begin() == 2  # a is still stepping
    a.end()
    assert a.begin() == 2
    b.end()
    a.end()
    assert b.begin() == 4
    b.close()
    assert a.begin() == 4  # a closed one counts as idle
    a.close()


def test_more_steppers_than_cores_get_one_thread_each(tmp_path) -> None:
    cores = [NodeCores(str(tmp_path), i, cores=2) for i in range(3)]
    assert [c.begin() for c in cores] == [2, 1, 1]
    with pytest.raises(ValueError):
        NodeCores(str(tmp_path), NodeCores.SLOTS, cores=2)
