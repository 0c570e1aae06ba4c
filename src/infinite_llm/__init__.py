"""infinite-llm: an LLM serving engine whose KV cache spans every instance of a cluster.

``LLM``, ``SamplingParams`` and the output types load on first use, so the pure-Python layers
(``kvcache``, ``scheduler``, ``sim``) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]

if TYPE_CHECKING:
    from infinite_llm.llm import LLM
    from infinite_llm.outputs import CompletionOutput, RequestOutput
    from infinite_llm.sampling_params import SamplingParams
    from infinite_llm.structured_outputs import StructuredOutputsParams

_LAZY = {
    "LLM": "infinite_llm.llm",
    "CompletionOutput": "infinite_llm.outputs",
    "RequestOutput": "infinite_llm.outputs",
    "SamplingParams": "infinite_llm.sampling_params",
    "StructuredOutputsParams": "infinite_llm.structured_outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infinite_llm' has no attribute {name!r}")
