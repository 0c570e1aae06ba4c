"""Where instance actors go: one bundle per instance in a Ray placement group, spread over the
cluster's nodes (one instance per node while there are nodes to spare), and how many threads
each actor computes with once it is placed.

Threads: the instances on one node share its cores evenly (``share_cores``). They step at the
same time, each in its own process with its own OpenMP team, and two teams of all the cores
spin against each other: SmolLM2 at a 4K context on 2 cores, two busy actors of 2 threads each
took 222 ms a step against 78 ms with 1 thread each (one busy actor: 38 against 47 ms).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_TIMEOUT_S = 120.0


def node_threads(requested: int | None = None) -> int:
    """The threads an instance actor computes with on this node: ``requested``, else every core
    this process may run on."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def share_cores(actors: Mapping[int, Any]) -> dict[int, int]:
    """Give each instance actor its node's cores divided by the instance actors there (at least
    one); returns the threads of each."""
    where = dict(zip(actors, ray.get([a.placement.remote() for a in actors.values()])))
    per_node = Counter(node for node, _ in where.values())
    threads = {i: max(1, cores // per_node[node]) for i, (node, cores) in where.items()}
    ray.get([actors[i].set_num_threads.remote(n) for i, n in threads.items()])
    return threads


class InstancePlacement:
    """A placement group with one ``{"CPU": 1}`` bundle per instance, ``SPREAD`` over nodes;
    ``options(i)`` places instance ``i`` in its bundle. Raises ``RuntimeError`` with what is
    missing when the cluster cannot hold the instances within ``PLACEMENT_TIMEOUT_S``."""

    def __init__(self, num_instances: int, strategy: str = "SPREAD") -> None:
        self.group = placement_group([{"CPU": 1}] * num_instances, strategy=strategy)
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            self.remove()
            total = ray.cluster_resources().get("CPU", 0)
            raise RuntimeError(
                f"Ray could not place {num_instances} instance actors (one CPU each, "
                f"{strategy}) within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {total:g} "
                "CPUs: add nodes or use fewer instances"
            ) from None

    def options(self, index: int) -> dict[str, Any]:
        return {
            "num_cpus": 1,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index
            ),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)
