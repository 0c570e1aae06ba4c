"""Model, device and network specifications for the simulator's roofline cost model.

Every number here is a public spec or a documented assumption (see ``presets.py`` for the
values and their sources). Derived quantities (weight bytes, KV bytes per token, the KV pool
an instance has left after its weights) are computed here once, so the cost model and the
presets agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer as the cost model sees it (fp16 weights and KV by default)."""

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weight_bytes_per_param: int = 2
    kv_bytes_per_elem: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.weight_bytes_per_param

    @property
    def weight_bytes_read_per_step(self) -> float:
        """Every weight is read once per forward pass, except the embedding table (rows only)."""
        return (self.num_params - self.vocab_size * self.hidden_size) * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token for every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def linear_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through the decoder layers (2 per multiply-add), without the
        embedding lookup and the LM head (the head runs only on sampled rows)."""
        return 2.0 * (self.num_params - 2 * self.vocab_size * self.hidden_size)

    @property
    def lm_head_flops_per_sample(self) -> float:
        return 2.0 * self.hidden_size * self.vocab_size

    @property
    def attention_flops_per_pair(self) -> float:
        """One query token against one cached token, all layers: q.k and p.v, 2 FLOPs per MAC."""
        return 4.0 * self.num_heads * self.head_dim * self.num_layers

    @property
    def query_bytes_per_token_layer(self) -> int:
        """One token's query for one layer (what DistAttention sends to a creditor)."""
        return self.num_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def partial_bytes_per_token_layer(self) -> int:
        """One token's partial output plus its float32 log-sum-exp per head (what comes back)."""
        return self.num_heads * (self.head_dim * self.kv_bytes_per_elem + 4)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. Rates are peak specs; the efficiencies say how much a kernel reaches."""

    name: str
    memory_bytes: float
    peak_flops: float
    memory_bandwidth: float
    flops_efficiency: float
    bandwidth_efficiency: float
    memory_utilization: float  # share of memory the engine may use (vLLM's gpu_memory_utilization)
    activation_reserve_bytes: float  # kept free for activations and the allocator, per device
    link_bandwidth: float  # tensor-parallel interconnect inside a node, bytes/s per direction
    allreduce_latency_s: float  # one small all-reduce over 2 devices of a node
    # what each doubling of the group beyond 2 adds to a small all-reduce (more ring steps)
    allreduce_latency_per_doubling_s: float = 0.0
    devices_per_node: int = 8  # a larger tensor-parallel group spans nodes over the network

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.memory_bandwidth * self.bandwidth_efficiency


@dataclass(frozen=True)
class NetworkSpec:
    """Between instances: one message costs latency plus bytes over bandwidth."""

    bandwidth: float  # bytes/s per instance, per direction
    latency_s: float  # one way, including the messaging software

    @property
    def round_trip_s(self) -> float:
        return 2 * self.latency_s


@dataclass(frozen=True)
class InstanceSpec:
    """One serving instance: a model on ``tp_size`` devices, joined to the others by a network."""

    model: ModelSpec
    device: DeviceSpec
    tp_size: int
    network: NetworkSpec
    step_overhead_s: float  # scheduling, input preparation and sampling per step
    per_seq_overhead_s: float  # the same, per scheduled request

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.kv_pool_bytes <= 0:
            raise ValueError(
                f"{self.model.name} on {self.tp_size}x {self.device.name} leaves no memory for KV"
            )

    @property
    def flops(self) -> float:
        return self.device.effective_flops * self.tp_size

    @property
    def bandwidth(self) -> float:
        return self.device.effective_bandwidth * self.tp_size

    @property
    def kv_pool_bytes(self) -> float:
        d = self.device
        usable = self.tp_size * (d.memory_bytes * d.memory_utilization - d.activation_reserve_bytes)
        return usable - self.model.weight_bytes

    def allreduce_seconds(self, nbytes: float) -> float:
        """One all-reduce of ``nbytes`` (per device) over the tensor-parallel group: a latency
        that grows with each doubling of the group, plus a ring's 2 (t - 1) / t of the bytes
        over the slowest link crossed (NVLink inside a node; the network between nodes, whose
        round trip is paid once per doubling of the node count)."""
        t = self.tp_size
        if t <= 1:
            return 0.0
        d, net = self.device, self.network
        nodes = math.ceil(t / d.devices_per_node)
        latency = d.allreduce_latency_s + d.allreduce_latency_per_doubling_s * (math.log2(t) - 1)
        if nodes > 1:
            latency += net.round_trip_s * math.log2(nodes)
        link = d.link_bandwidth if nodes == 1 else min(d.link_bandwidth, net.bandwidth)
        return latency + 2 * (t - 1) / t * nbytes / link

    def kv_pool_tokens(self) -> int:
        return int(self.kv_pool_bytes // self.model.kv_bytes_per_token)

    def num_blocks(self, block_size: int) -> int:
        """rBlocks of ``block_size`` tokens that fit the KV pool."""
        return self.kv_pool_tokens() // block_size
