"""Load a Hugging Face directory: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from infinite_llm.model.config import ModelArchConfig


def read_hf_arch(model_dir: str) -> ModelArchConfig:
    with open(os.path.join(model_dir, "config.json")) as f:
        return ModelArchConfig.from_hf_dict(json.load(f))


def iter_safetensors(model_dir: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in tqdm(
                list(f.keys()),
                desc=f"loading {os.path.basename(file)}",
                unit="tensor",
                disable=not progress,
                leave=False,
            ):
                yield name, f.get_tensor(name)


def load_hf_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
