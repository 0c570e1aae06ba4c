"""The cluster: instances, router, gManager, and the transports between them (in-process, Ray)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinite_llm.cluster.base import Cluster
    from infinite_llm.config import EngineConfig
    from infinite_llm.model.loader import LoadedModel


def create_cluster(config: EngineConfig, loaded: LoadedModel) -> Cluster:
    if config.backend == "ray":
        from infinite_llm.cluster.ray_cluster import RayCluster

        return RayCluster(config, loaded)
    from infinite_llm.cluster.inprocess import InProcessCluster

    return InProcessCluster(config, loaded)
