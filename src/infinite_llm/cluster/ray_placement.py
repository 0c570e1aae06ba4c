"""Where instance actors go: one bundle per instance in a Ray placement group (a host pool in
its model instance's), spread over the cluster's nodes (one bundle per node while there are
nodes to spare), and how many threads each actor computes with once it is placed.

Threads: the instances on one node share its cores among those stepping at the moment
(``NodeCores``). Each steps in its own process with its own OpenMP team, and two teams of all
the cores spin against each other: SmolLM2 at a 4K context on 2 cores, two busy actors of 2
threads each took 222 ms a step against 78 ms with 1 thread each; one busy actor took 38 ms
with 2 threads against 47 ms with 1, and a debtor whose creditors only serve its MAs is the one
busy actor of its node.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from infinite_llm.cluster.layout import PoolLayout

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


class NodeCores:
    """The cores of one node, shared by the instance actors on it that are stepping now: a
    byte per instance in a shared file of the cluster's directory on that node (``begin`` sets
    it, ``end`` clears it). An actor that steps alone takes every core; actors that step at once
    split them. Two that start together may both count the other or not; either way the next
    step corrects it."""

    SLOTS = 4096

    def __init__(self, directory: str, instance_id: int, cores: int | None = None) -> None:
        if not 0 <= instance_id < self.SLOTS:
            raise ValueError(f"instance id {instance_id} outside 0..{self.SLOTS - 1}")
        self.cores = node_threads(cores)
        self._slot = instance_id
        fd = os.open(os.path.join(directory, "stepping"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            if os.fstat(fd).st_size < self.SLOTS:
                os.ftruncate(fd, self.SLOTS)
            self._flags = mmap.mmap(fd, self.SLOTS)
        finally:
            os.close(fd)

    def begin(self) -> int:
        """This instance steps now: the threads its step may use."""
        self._flags[self._slot] = 1
        return max(1, self.cores // max(1, self._flags[:].count(1)))

    def end(self) -> None:
        self._flags[self._slot] = 0

    def close(self) -> None:
        self.end()
        self._flags.close()


class InstancePlacement:
    """A placement group with one bundle per model instance and per memory instance, ``SPREAD``
    over nodes; a model instance's host pool shares its bundle, so its node (a CPU each: a
    lender computes its debtors' MAs on one thread). ``options(i)`` places instance ``i`` in
    its bundle. Raises ``RuntimeError`` with what is missing when the cluster cannot hold the
    instances within ``PLACEMENT_TIMEOUT_S``."""

    def __init__(self, layout: PoolLayout, strategy: str = "SPREAD", gpus: bool = False) -> None:
        """``gpus``: the model instances run on CUDA, a GPU each (in their bundle, and asked
        for by their actor, so Ray makes that GPU the one the actor sees); lenders take none."""
        cpus = [1] * layout.num_instances  # per bundle
        self.gpus = gpus
        self.num_model_instances = layout.num_instances
        self.bundle_of = {i: i for i in range(layout.num_instances)}
        for lender in layout.lenders:
            if lender.host_of is None:
                self.bundle_of[lender.instance_id] = len(cpus)
                cpus.append(1)
            else:
                self.bundle_of[lender.instance_id] = lender.host_of
                cpus[lender.host_of] += 1
        self.bundles = [
            {"CPU": n, "GPU": 1} if gpus and b < layout.num_instances else {"CPU": n}
            for b, n in enumerate(cpus)
        ]
        self.group = placement_group(self.bundles, strategy=strategy)
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            self.remove()
            resources = ray.cluster_resources()
            has = f"{resources.get('CPU', 0):g} CPUs" + (
                f" and {resources.get('GPU', 0):g} GPUs" if gpus else ""
            )
            each = "one CPU each" + (", a GPU per model instance" if gpus else "")
            raise RuntimeError(
                f"Ray could not place {len(self.bundle_of)} instance actors ({each}, "
                f"in {len(cpus)} bundles {strategy}) within {PLACEMENT_TIMEOUT_S:.0f} s; the "
                f"cluster has {has}: add nodes or use fewer instances"
            ) from None

    def options(self, instance_id: int) -> dict[str, Any]:
        gpu = self.gpus and instance_id < self.num_model_instances
        return {
            "num_cpus": 1,
            "num_gpus": 1 if gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group,
                placement_group_bundle_index=self.bundle_of[instance_id],
            ),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)
