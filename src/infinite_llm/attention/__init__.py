"""DistAttention: exact MicroAttention (MA) over rBlocks on any instance, merged by log-sum-exp."""

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.merge import merge_attention_states
from infinite_llm.attention.micro import micro_attention

__all__ = ["MABatch", "merge_attention_states", "micro_attention"]
