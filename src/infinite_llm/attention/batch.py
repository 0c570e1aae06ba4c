"""``MABatch``: the work of one MicroAttention call, a batch of requests against one pool's rBlocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class FlatTables:
    """An ``MABatch`` as flat index tensors: request ``i``'s block ids are
    ``block_table[block_start[i]:block_start[i+1]]``; its query rows ``query_start[i]:query_start[i+1]``."""

    query_start: torch.Tensor  # [n + 1] int64
    block_table: torch.Tensor  # [sum of blocks] int32
    block_start: torch.Tensor  # [n + 1] int64
    context_lens: torch.Tensor  # [n] int64


@dataclass(frozen=True)
class Part:
    """A sub-batch and the rows of the parent batch's queries that it owns (int64 [rows])."""

    batch: MABatch
    rows: torch.Tensor


@dataclass
class MABatch:
    """Queries of several requests against rBlocks of one pool.

    Request ``i`` owns query rows ``query_start[i]:query_start[i+1]`` of ``q`` and attends to the
    first ``context_lens[i]`` tokens stored in ``block_ids[i]`` (blocks listed in logical order;
    only the last may be partly filled).

    For causal masking (``micro_attention(..., causal=True)``) the shard's keys must be
    logically contiguous: key ``j`` of request ``i`` sits at position ``kv_start_pos[i] + j`` and
    query row ``r`` at ``q_start_pos[i] + r``; a key is visible when its position is <= the query's.
    """

    query_lens: list[int]
    block_ids: list[list[int]]
    context_lens: list[int]
    block_size: int
    q_start_pos: list[int] | None = None
    kv_start_pos: list[int] | None = None
    query_start: list[int] = field(init=False)
    # Per request: (first block, count) when its blocks form one contiguous run, so the pool can be
    # read through a view instead of a gather; else an index tensor for index_select.
    _runs: list[int | torch.Tensor] = field(init=False, repr=False)
    _flat: FlatTables | None = field(init=False, repr=False, compare=False, default=None)
    _parts: dict[int, tuple[Part | None, Part | None]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _memo: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.query_lens)
        if not (len(self.block_ids) == len(self.context_lens) == n):
            raise ValueError(
                "query_lens, block_ids and context_lens must have one entry per request"
            )
        starts = [0]
        for length in self.query_lens:
            starts.append(starts[-1] + length)
        self.query_start = starts
        for blocks, ctx in zip(self.block_ids, self.context_lens):
            if (
                not (len(blocks) - 1) * self.block_size < ctx <= len(blocks) * self.block_size
                and ctx
            ):
                raise ValueError(
                    f"context of {ctx} tokens does not fit {len(blocks)} blocks of {self.block_size}"
                )
        self._runs = []  # built on the first gather (the native kernels read the block table)

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def num_query_rows(self) -> int:
        return self.query_start[-1]

    def gather_kv(self, cache: torch.Tensor, i: int) -> torch.Tensor:
        """Request ``i``'s keys (or values) from a pool tensor [Hkv, num_blocks, bs, D] -> [Hkv, ctx, D]."""
        if not self._runs:
            self._runs = [_run_or_index(blocks) for blocks in self.block_ids]
        run = self._runs[i]
        n = len(self.block_ids[i])
        if isinstance(run, int):
            blocks = cache[:, run : run + n]  # a view: no copy
        else:
            blocks = cache.index_select(1, run.to(cache.device))
        h, _, bs, d = cache.shape
        return blocks.reshape(h, n * bs, d)[:, : self.context_lens[i]]

    def flat_tables(self) -> FlatTables:
        """The batch as flat CPU index tensors for native kernels; built once, reused by every layer."""
        if self._flat is None:
            starts = [0]
            for blocks in self.block_ids:
                starts.append(starts[-1] + len(blocks))
            self._flat = FlatTables(
                query_start=torch.tensor(self.query_start, dtype=torch.int64),
                block_table=torch.tensor(
                    [b for blocks in self.block_ids for b in blocks], dtype=torch.int32
                ),
                block_start=torch.tensor(starts, dtype=torch.int64),
                context_lens=torch.tensor(self.context_lens, dtype=torch.int64),
            )
        return self._flat

    def memo(self, key: object, compute: Callable[[], T]) -> T:
        """``compute()``, once per batch and key: what a kernel derives from the batch is derived
        once per step, not once per layer."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def subset(self, requests: Sequence[int]) -> Part:
        """The batch of only ``requests`` (in that order) and the query rows they own here."""
        rows: list[int] = []
        for i in requests:
            rows.extend(range(self.query_start[i], self.query_start[i + 1]))
        pick = list(requests)
        batch = MABatch(
            query_lens=[self.query_lens[i] for i in pick],
            block_ids=[self.block_ids[i] for i in pick],
            context_lens=[self.context_lens[i] for i in pick],
            block_size=self.block_size,
            q_start_pos=None if self.q_start_pos is None else [self.q_start_pos[i] for i in pick],
            kv_start_pos=None
            if self.kv_start_pos is None
            else [self.kv_start_pos[i] for i in pick],
        )
        return Part(batch, torch.tensor(rows, dtype=torch.long))

    def split_by_query_len(self, max_query_len: int) -> tuple[Part | None, Part | None]:
        """(requests with at most ``max_query_len`` query rows, the others); None for an empty side.

        Memoised: a step's batch is split once and reused by every layer.
        """
        if max_query_len not in self._parts:
            few = [i for i, n in enumerate(self.query_lens) if n <= max_query_len]
            many = [i for i, n in enumerate(self.query_lens) if n > max_query_len]
            self._parts[max_query_len] = (
                self.subset(few) if few else None,
                self.subset(many) if many else None,
            )
        return self._parts[max_query_len]

    @classmethod
    def single(
        cls, query_len: int, block_ids: Sequence[int], context_len: int, block_size: int
    ) -> MABatch:
        return cls([query_len], [list(block_ids)], [context_len], block_size)


def _run_or_index(blocks: list[int]) -> int | torch.Tensor:
    """The first block of a contiguous run of blocks, else the blocks as an index tensor."""
    if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and _is_run(blocks):
        return blocks[0]
    return torch.tensor(blocks, dtype=torch.long)


def _is_run(blocks: list[int]) -> bool:
    return all(b == blocks[0] + j for j, b in enumerate(blocks))
