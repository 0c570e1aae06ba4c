"""What an instance actor is built from (``InstanceSpec``) and how: the weights and pool of a
model actor, or the pool alone of a lender (a memory instance or a host pool), then the
RManager, the allocator (borrowing or local), the scheduler and the runner around them. The
actor (``ray_actor``) serves what is built here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.cluster.layout import Lender
from infinite_llm.cluster.ray_transport import RayTransport
from infinite_llm.config import EngineConfig
from infinite_llm.engine.instance import Instance
from infinite_llm.engine.model_runner import ModelRunner
from infinite_llm.engine.structured import StructuredOutputs
from infinite_llm.kvcache.borrow import Borrower, GManagerLike
from infinite_llm.kvcache.metrics import BorrowStats
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.tiers import Tier
from infinite_llm.model.config import ModelArchConfig
from infinite_llm.model.llama import LlamaForCausalLM
from infinite_llm.model.loader import model_dir_for, parse_dtype
from infinite_llm.model.loader.hf_loader import iter_safetensors, load_hf_tokenizer, read_hf_arch
from infinite_llm.model.registry import resolve_model
from infinite_llm.native.build import release_openmp_team
from infinite_llm.scheduler.allocator import LocalAllocator
from infinite_llm.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class InstanceSpec:
    """What an instance actor is built from: one for every model actor (each gets its own id),
    one per lender."""

    config: EngineConfig
    num_blocks: int
    lending_cap: float
    borrowing: bool
    cluster_token: str  # names this cluster's channel files on every node
    heartbeat_interval_s: float = 0.05  # a beat costs two processes some Python: keep them few
    lender: Lender | None = None  # a pool without the model: no weights, lends every rBlock

    def for_lender(self, lender: Lender) -> InstanceSpec:
        """A lender's spec: its own pool size, every rBlock lendable."""
        return dataclasses.replace(
            self, num_blocks=lender.num_blocks, lending_cap=1.0, lender=lender
        )


def read_arch(config: EngineConfig) -> ModelArchConfig:
    """The model's shape from its directory's config, without reading a weight (a lender's
    pool needs only the layers, KV heads and head size)."""
    return read_hf_arch(model_dir_for(resolve_model(config.model), progress=False))


def load_weights(config: EngineConfig) -> LlamaForCausalLM:
    """``load_model`` without the tokenizer: an actor never sees text, and the tokenizer's
    transformers import is a third of an actor's start-up (torch's own import is the rest)."""
    model_dir = model_dir_for(resolve_model(config.model), progress=False)
    dtype, device = parse_dtype(config.dtype), torch.device(config.device)
    net = LlamaForCausalLM(read_hf_arch(model_dir), dtype, device)
    net.load_weights(
        (name, t.to(device=device, dtype=dtype)) for name, t in iter_safetensors(model_dir, False)
    )
    net.eval()
    net.prepack()
    release_openmp_team()  # loaded on the actor's main thread; its steps run on another
    return net


def make_runner(
    config: EngineConfig, model: LlamaForCausalLM, transport: RayTransport, seed: int
) -> ModelRunner:
    """A model actor's runner; the tokenizer is loaded only if a grammar-constrained request
    comes."""
    model_dir = model_dir_for(resolve_model(config.model), progress=False)
    structured = StructuredOutputs(
        functools.partial(load_hf_tokenizer, model_dir), model.arch.vocab_size
    )
    return ModelRunner(model, config.cache.block_size, transport, seed, structured)


def load(spec: InstanceSpec) -> tuple[LlamaForCausalLM | None, KVPool]:
    """A model actor's weights and pool; a lender's pool alone (no weights). A lender's pool is
    its own process's host memory: what reaches it crosses through shared memory, so pinning
    it (which needs a GPU here) would buy nothing."""
    config = spec.config
    model = None if spec.lender is not None else load_weights(config)
    arch = read_arch(config) if model is None else model.arch
    pool = KVPool(
        arch.num_layers,
        arch.num_kv_heads,
        arch.head_dim,
        spec.num_blocks,
        config.cache.block_size,
        parse_dtype(config.dtype),
        torch.device(config.device if spec.lender is None else "cpu"),
    )
    return model, pool


def build_instance(
    instance_id: int,
    spec: InstanceSpec,
    model: LlamaForCausalLM | None,
    pool: KVPool,
    transport: RayTransport,
    gmanager: GManagerLike,
    borrow_stats: BorrowStats,
) -> Instance:
    """The instance around ``pool``: a lender's scheduler never gets a request; a model
    actor borrows through ``transport`` on ``gmanager``'s recommendations when ``spec`` lets
    it."""
    config, lender = spec.config, spec.lender
    block_size = config.cache.block_size
    rmanager = RManager(
        instance_id,
        spec.num_blocks,
        lending_cap=spec.lending_cap,
        tier=Tier.DEVICE if lender is None else lender.tier,
        host_of=None if lender is None else lender.host_of,
    )
    prefix_block_size = block_size if config.cache.enable_prefix_caching else None
    if model is None:
        allocator: Borrower | LocalAllocator = LocalAllocator(rmanager)
    elif spec.borrowing:
        allocator = Borrower(
            rmanager,
            gmanager,
            transport.lend,
            transport.release,
            stats=borrow_stats,
            prefix_block_size=prefix_block_size,
        )
    else:
        allocator = LocalAllocator(rmanager, prefix_block_size=prefix_block_size)
    scheduler = Scheduler(config.scheduler, block_size, allocator)
    runner = None
    if model is not None:
        runner = make_runner(config, model, transport, config.seed + instance_id)
    return Instance(instance_id, runner, pool, rmanager, scheduler, config.attention_impl)
