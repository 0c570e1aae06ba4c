"""infinite-llm: an LLM serving engine whose KV cache spans every instance of a cluster."""

from __future__ import annotations

__version__ = "0.1.0"
