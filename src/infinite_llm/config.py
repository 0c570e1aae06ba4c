"""Engine configuration: frozen dataclasses, one per subsystem, bundled in ``EngineConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.cluster.core import ClusterConfig
from infinite_llm.scheduler.scheduler import SchedulerConfig

BACKENDS = ("inprocess", "ray")


@dataclass(frozen=True)
class CacheConfig:
    """KV memory of each instance: ``num_blocks`` rBlocks, or as many as ``memory_bytes`` holds."""

    block_size: int = 16
    num_blocks: int | None = None  # per instance
    memory_bytes: int | None = None  # per instance; used when num_blocks is None
    # Largest share of an instance's pool lent to others at once. 1.0: lend any free rBlock, so one
    # request can grow into the whole cluster; lower it to keep room for the instance's own requests.
    lending_cap: float = 1.0
    enable_borrowing: bool = (
        True  # False: the vLLM-style baseline (a request lives on one instance)
    )
    # Reuse the KV of prompts' leading full rBlocks wherever it is cached (``kvcache.prefix``);
    # on by default, as in vLLM.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0.0 <= self.lending_cap <= 1.0:
            raise ValueError(f"lending_cap must be in [0, 1], got {self.lending_cap}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "cpu"
    num_instances: int = 1
    backend: str = "inprocess"
    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    max_model_len: int | None = None  # default: the model's context length, capped by KV capacity
    seed: int = 0
    attention_impl: str = "auto"
    # Most logprobs a request may ask for per token (vLLM's default, 20); -1: the whole vocabulary.
    max_logprobs: int = 20
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Memory instances: a KV pool and MicroAttention, no weights; they lend every rBlock and
    # never home a request. Their pool: ``kv_memory_per_memory_instance`` bytes (None: as
    # large as a model instance's).
    num_memory_instances: int = 0
    kv_memory_per_memory_instance: int | None = None
    # A host tier: each model instance also gets a pool of this many bytes in its host's
    # memory (``kvcache.tiers``), its MicroAttention run by the host's cores. None: none.
    host_kv_memory: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be at least 1, got {self.num_instances}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be >= -1, got {self.max_logprobs}")
        if self.num_memory_instances < 0:
            raise ValueError(f"num_memory_instances must be >= 0, got {self.num_memory_instances}")
        if self.num_memory_instances and not self.cache.enable_borrowing:
            raise ValueError("memory instances only lend: they need borrowing (drop --no-borrow)")
        if self.host_kv_memory is not None and not self.cache.enable_borrowing:
            raise ValueError("a host tier is reached by borrowing (drop --no-borrow)")
        if self.host_kv_memory is not None and self.host_kv_memory < 1:
            raise ValueError(f"host_kv_memory must be positive, got {self.host_kv_memory}")
        if (
            self.kv_memory_per_memory_instance is not None
            and self.kv_memory_per_memory_instance < 1
        ):
            raise ValueError(
                "kv_memory_per_memory_instance must be positive, got "
                f"{self.kv_memory_per_memory_instance}"
            )
