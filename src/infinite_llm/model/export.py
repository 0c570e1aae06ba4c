"""Export a model to a plain Hugging Face directory (dense safetensors + tokenizer + configs).

Peers such as vLLM cannot read our embedded GGUF. The export writes what our own loader runs
(the GGUF dequantized once into the model cache, a tiny model, or an HF directory), so a peer
computes with exactly our weights; the tests check those weights against transformers' own
GGUF loader. ``infinite-llm export-hf smollm2 DIR`` or ``python -m infinite_llm.model.export``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from infinite_llm.model.registry import resolve_model

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def _portable_tokenizer_config(out_dir: str) -> None:
    # transformers 5 names its own backend class; PreTrainedTokenizerFast reads the same
    # tokenizer.json in transformers 4 and 5 alike (and so in every peer's pinned release).
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export_hf(model: str, out_dir: str, dtype: str = "float32") -> str:
    """Write ``model`` (any ``--model`` value) to ``out_dir``; return the directory.

    Writes config.json, model.safetensors (in ``dtype``), tokenizer.json, tokenizer_config.json
    (chat template inside) and generation_config.json.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from infinite_llm.model.loader import model_dir_for
    from infinite_llm.model.loader.hf_loader import iter_safetensors, read_hf_arch

    start = time.perf_counter()
    source = resolve_model(model)
    src_dir = model_dir_for(source)
    arch = read_hf_arch(src_dir)
    os.makedirs(out_dir, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: t.to(torch_dtype).contiguous() for name, t in iter_safetensors(src_dir)}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = arch.to_hf_dict() | {"torch_dtype": dtype}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
            f,
            indent=2,
        )
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    tokenizer.model_max_length = arch.max_position_embeddings
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where tools
    # that predate chat_template.jinja look for it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    stale = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(stale):
        os.remove(stale)
    _portable_tokenizer_config(out_dir)
    log.info("exported %s to %s in %.1fs", source.name, out_dir, time.perf_counter() - start)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="embedded name (smollm2), .gguf file or HF directory")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(export_hf(args.model, args.out_dir, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
