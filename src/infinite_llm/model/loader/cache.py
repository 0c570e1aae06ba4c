"""The model cache: a GGUF converted once into a Hugging Face directory, reused on later loads.

Location: ``$INFINITE_LLM_CACHE`` or ``~/.cache/infinite-llm``. A cache entry is keyed by the
GGUF's absolute path, size and modification time, so an edited file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from infinite_llm.model.loader.gguf_loader import iter_gguf_weights, load_gguf_tokenizer, open_gguf

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the conversion changes


def cache_root() -> str:
    root = os.environ.get("INFINITE_LLM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "infinite-llm"
    )
    os.makedirs(root, exist_ok=True)
    return root


def _entry_name(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}"
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def gguf_as_hf_dir(path: str, progress: bool = True) -> str:
    """Return a Hugging Face directory holding the GGUF's weights (float32), config and tokenizer."""
    from safetensors.torch import save_file

    target = os.path.join(cache_root(), "models", _entry_name(path))
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    logger.info("converting %s into the model cache (once): %s", path, target)
    reader, arch = open_gguf(path)
    tensors = dict(iter_gguf_weights(reader, arch, progress=progress))
    tokenizer = load_gguf_tokenizer(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(arch.to_hf_dict(), f, indent=2)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
