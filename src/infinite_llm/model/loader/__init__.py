"""Turn a ``--model`` value into a ready model and tokenizer (GGUF, Hugging Face directory, tiny)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from infinite_llm.model.config import ModelArchConfig
from infinite_llm.model.llama import LlamaForCausalLM
from infinite_llm.model.loader.cache import gguf_as_hf_dir
from infinite_llm.model.loader.hf_loader import iter_safetensors, load_hf_tokenizer, read_hf_arch
from infinite_llm.model.loader.tiny import tiny_model_dir
from infinite_llm.model.registry import ModelFormat, ModelSource, resolve_model
from infinite_llm.model.tokenizer import Tokenizer
from infinite_llm.native.build import release_openmp_team

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from float32, bfloat16, float16")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    source: ModelSource
    arch: ModelArchConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    model_dir: str  # the Hugging Face directory the weights were read from


def model_dir_for(source: ModelSource, progress: bool = True) -> str:
    """The Hugging Face directory behind a source (GGUFs and tiny models are materialised once)."""
    if source.format is ModelFormat.GGUF:
        assert source.path is not None
        return gguf_as_hf_dir(source.path, progress=progress)
    if source.format is ModelFormat.TINY:
        return tiny_model_dir(source.name)
    assert source.path is not None
    return source.path


def load_model(
    model: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load weights and tokenizer; raises ValueError/FileNotFoundError naming the problem."""
    start = time.perf_counter()
    source = resolve_model(model)
    torch_dtype = parse_dtype(dtype)
    torch_device = torch.device(device)
    model_dir = model_dir_for(source, progress=progress)
    arch = read_hf_arch(model_dir)
    net = LlamaForCausalLM(arch, torch_dtype, torch_device)
    net.load_weights(
        (name, tensor.to(device=torch_device, dtype=torch_dtype))
        for name, tensor in iter_safetensors(model_dir, progress)
    )
    net.eval()
    net.prepack()
    release_openmp_team()  # whichever thread steps the model gets the process's one team
    tokenizer = Tokenizer(load_hf_tokenizer(model_dir))
    logger.info("loaded %s (%s, %.1fs)", source.name, torch_dtype, time.perf_counter() - start)
    return LoadedModel(source, arch, net, tokenizer, model_dir)
