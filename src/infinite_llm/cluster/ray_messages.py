"""What crosses between instance actors besides control messages: tensors in actor calls
and the Python channel's shard messages.

Tensors that cross in actor calls (defragmentation's rBlock copies) travel as numpy arrays
(``pack``/``unpack``): pickle protocol 5 moves their buffers without copying them through
pickle; a torch tensor pickles through ``torch.save``, 5-10x slower for these sizes. A shard
message on a channel (``cluster.channel``) is a ``ShardHeader`` plus the layer's tensors;
``ShardReceiver`` rebuilds the creditor's ``ShardWork`` from it. (A whole-step native decode's
layers cross in C instead: ``native_plane``.)
"""

from __future__ import annotations

import numpy as np
import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.dist import ShardWork

Packed = tuple[np.ndarray, str]  # (array, torch dtype name when numpy lacks it: "bfloat16")


def pack(t: torch.Tensor | None) -> Packed | None:
    """A tensor as a numpy array for the wire (only its own elements, never a larger base; a
    GPU tensor through host memory)."""
    if t is None:
        return None
    t = host(t.detach()).contiguous()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), ""


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory: what crosses a process boundary (the channels' shared memory,
    ZeroMQ frames, Ray's object store) is host memory; a GPU instance copies out and in."""
    return t if t.is_cpu else t.cpu()


def unpack(p: Packed | None) -> torch.Tensor | None:
    if p is None:
        return None
    array, kind = p
    if not array.flags.writeable:  # zero-copy from the object store: read-only
        array = array.copy()
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if kind == "bfloat16" else t


BatchSpec = tuple[
    list[int], list[list[int]], list[int]
]  # MABatch: query_lens, block_ids, context_lens
# A shard message's header: layer, the MA's block lists (None: no MA, or ``same``), and
# ``same``: the creditor reuses the batch this debtor sent last (a step's plan hands every
# layer the same MABatch, and a debtor waits for each layer, so it always arrived first).
ShardHeader = tuple[int, BatchSpec | None, bool]


class ShardReceiver:
    """The creditor's side of a shard message: rebuilds the ``ShardWork``, caching each
    debtor's ``MABatch`` for the rest of its step (its flat tables are built once, not per layer)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._batches: dict[int, MABatch | None] = {}  # debtor_id -> its current step's batch

    def work(
        self, debtor_id: int, header: ShardHeader, tensors: list[torch.Tensor | None]
    ) -> ShardWork:
        _, spec, same = header
        if same:
            batch = self._batches[debtor_id]
        else:
            batch = None if spec is None else MABatch(spec[0], spec[1], spec[2], self.block_size)
            self._batches[debtor_id] = batch
        q, slots, k, v = tensors
        return ShardWork(slots, k, v, q, batch)

    def forget(self, debtor_id: int) -> None:
        self._batches.pop(debtor_id, None)
