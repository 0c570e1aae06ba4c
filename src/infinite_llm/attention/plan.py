"""The step plan: where each request's context lives and where its new tokens go.

Built once per step by the model runner from the requests' persistent ``BlockTable``s
(``DistPlan``): per instance, the batch of context rBlocks its MicroAttention reads
(``MABatch``) and the query rows it serves; per instance, the rows and slots of the new K,V it
stores. Every kernel's per-step tables are derived from it once and memoised on it
(``DistPlan.memo``). ``attention/dist.py`` runs a step from its plan.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.kvcache.block import BlockRef, BlockTable

_T = TypeVar("_T")


@dataclass(frozen=True)
class StepSpan:
    """One request's share of a step: its rBlocks (its persistent ``BlockTable``; a list of
    refs is turned into one), tokens already cached, tokens computed now."""

    block_table: BlockTable | Sequence[BlockRef]
    num_computed_tokens: int
    num_new_tokens: int

    def table(self) -> BlockTable:
        table = self.block_table
        return table if isinstance(table, BlockTable) else BlockTable(table)


@dataclass
class _Shard:
    rows: torch.Tensor | None  # query rows sent to this instance (None: all rows, in order)
    batch: MABatch
    requests: list[int]  # the step's request index of each of the batch's requests


@dataclass
class _Write:
    rows: torch.Tensor | None  # token rows whose k, v go to this instance (None: all)
    slots: torch.Tensor


class DistPlan:
    """Where each request's context lives and where its new tokens go, computed once per step."""

    def __init__(
        self, spans: Sequence[StepSpan], block_size: int, device: torch.device | str = "cpu"
    ) -> None:
        self.query_lens = [s.num_new_tokens for s in spans]
        self.num_tokens = sum(self.query_lens)
        # Prefill chunks (more than one new token) get a causal self part; decode tokens don't.
        self.prefill_query_lens = [n for n in self.query_lens if n > 1]
        shard_reqs: dict[int, list[tuple[int, list[int], int]]] = {}
        write_rows: dict[int, list[int]] = {}
        write_slots: dict[int, list[int]] = {}
        row = 0
        for idx, span in enumerate(spans):
            ctx = span.num_computed_tokens
            table = span.table()
            if len(table) * block_size < ctx + span.num_new_tokens:
                raise ValueError(
                    f"request {idx}: {len(table)} rBlocks cannot hold {ctx + span.num_new_tokens} tokens"
                )
            # A decode token attends to the cache including its own (stored first) K,V.
            if span.num_new_tokens == 1:
                ctx += 1
            num_ctx_blocks = -(-ctx // block_size)
            # Each instance's context blocks: a prefix of its blocks in the table (their logical
            # indices are sorted), sliced from the table's persistent per-instance lists.
            for inst, (blocks, positions) in table.by_instance():
                n = (
                    len(positions)
                    if positions[-1] < num_ctx_blocks
                    else bisect_left(positions, num_ctx_blocks)
                )
                if not n:
                    continue
                # Every context block is full except the logically last one, listed last on its instance.
                tokens = n * block_size
                if positions[n - 1] == num_ctx_blocks - 1:
                    tokens -= num_ctx_blocks * block_size - ctx
                shard_reqs.setdefault(inst, []).append((idx, blocks[:n], tokens))
            first_new = span.num_computed_tokens
            for pos in range(first_new, first_new + span.num_new_tokens):
                ref = table[pos // block_size]
                write_rows.setdefault(ref.instance_id, []).append(row + pos - first_new)
                write_slots.setdefault(ref.instance_id, []).append(
                    ref.block_id * block_size + pos % block_size
                )
            row += span.num_new_tokens

        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.shards: dict[int, _Shard] = {}
        for inst, reqs in shard_reqs.items():
            batch = MABatch(
                query_lens=[self.query_lens[i] for i, _, _ in reqs],
                block_ids=[blocks for _, blocks, _ in reqs],
                context_lens=[tokens for _, _, tokens in reqs],
                block_size=block_size,
            )
            rows: list[int] = []
            for i, _, _ in reqs:
                rows.extend(range(starts[i], starts[i + 1]))
            self.shards[inst] = _Shard(self._index(rows, device), batch, [i for i, _, _ in reqs])
        prefill_rows = [
            r
            for i, n in enumerate(self.query_lens)
            if n > 1
            for r in range(starts[i], starts[i + 1])
        ]
        self.prefill_rows = self._index(prefill_rows, device) if prefill_rows else None
        self.query_start = starts
        self.block_size = block_size
        self._memo: dict[object, object] = {}
        self.writes = {
            inst: _Write(
                self._index(write_rows[inst], device),
                torch.tensor(slots, dtype=torch.long, device=device),
            )
            for inst, slots in write_slots.items()
        }

    def _index(self, rows: list[int], device: torch.device | str) -> torch.Tensor | None:
        if len(rows) == self.num_tokens and rows == list(range(self.num_tokens)):
            return None  # every row, in order: no gather or scatter needed
        return torch.tensor(rows, dtype=torch.long, device=device)

    def memo(self, key: object, compute: Callable[[], _T]) -> _T:
        """``compute()`` once per step and key (an executor's per-step tables, reused by every layer)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]  # type: ignore[return-value]

    @property
    def instance_ids(self) -> set[int]:
        return set(self.shards) | set(self.writes)

    def context_bytes(self, head_dim: int, num_kv_heads: int, dtype_size: int) -> dict[int, int]:
        """Per instance: bytes of K and V one layer's MA reads (for the bandwidth figures)."""
        return {
            inst: sum(shard.batch.context_lens) * 2 * num_kv_heads * head_dim * dtype_size
            for inst, shard in self.shards.items()
        }


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` a shard or write names (None: all of them, in order)."""
    return x if rows is None else x.index_select(0, rows)
