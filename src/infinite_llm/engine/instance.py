"""``Instance``: one model replica with its own KV pool, RManager and scheduler.

Both transports drive instances through these methods: its own requests (add, abort, step),
its role as a creditor (lend, reclaim, serve MicroAttention on the rBlocks it lent) and as a
debtor (through its scheduler's allocator, which borrows), plus heartbeats and migration.

A *memory instance* has no model runner: a pool, its RManager and MicroAttention over the
rBlocks it lends, and a scheduler that never gets a request (so every loop over instances
works unchanged). It is only ever a creditor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from infinite_llm.attention.dist import LocalExecutor, ShardWork
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.engine.events import StepEvent
from infinite_llm.engine.model_runner import ModelRunner, PromptLogprobs
from infinite_llm.kvcache.messages import Heartbeat, LendReply, LendRequest, Release
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.scheduler import recovery
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler


class Instance:
    def __init__(
        self,
        instance_id: int,
        runner: ModelRunner | None,
        pool: KVPool,
        rmanager: RManager,
        scheduler: Scheduler,
        attention_impl: str = "auto",
    ) -> None:
        self.instance_id = instance_id
        self.runner = runner
        self.pool = pool
        self.rmanager = rmanager
        self.scheduler = scheduler
        self.attention_impl = attention_impl
        self._local = LocalExecutor({instance_id: pool}, impl=attention_impl)

    @property
    def is_memory(self) -> bool:
        """A memory instance: no model, it holds rBlocks for others and homes no request."""
        return self.runner is None

    # -- own requests -----------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if self.runner is None:
            raise ValueError(
                f"instance {self.instance_id} is a memory instance: it lends rBlocks, it does "
                "not run requests"
            )
        request.home_instance_id = self.instance_id
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id) is not None

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish_request(request, status)

    def step(self) -> list[StepEvent]:
        """Schedule, run the model once, advance the requests; nothing to do -> []."""
        if self.runner is None:
            return []
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        prompt_logprobs = PromptLogprobs()
        sampled = self.runner.execute(out, prompt_logprobs)
        results = self.scheduler.update_from_output(
            out, {rid: s.token_id for rid, s in sampled.items()}
        )
        return [
            StepEvent(
                r.request.request_id,
                sampled.get(r.request.request_id),
                r.request.status.finish_reason,
                r.request.stop_reason,
                r.request.num_preemptions,
                prompt_logprobs.entries.get(r.request.request_id),
                r.request.num_cached_tokens,
                prompt_logprobs.ranks.get(r.request.request_id),
            )
            for r in results
        ]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- creditor side ----------------------------------------------------------------------
    def lend(self, request: LendRequest) -> LendReply:
        return self.rmanager.lend(request)

    def reclaim(self, release: Release) -> None:
        self.rmanager.reclaim(release)

    def run_shard(
        self, layer_idx: int, work: ShardWork
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A debtor's share of one layer on this pool: store its new K,V, then MA over its rBlocks
        (the same order as every executor: a decode token's MA reads its own K,V)."""
        return self._local.run(layer_idx, {self.instance_id: work}).get(self.instance_id)

    # -- cluster housekeeping ---------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        return self.rmanager.heartbeat()

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.write_blocks(block_ids, k, v)

    def relocate(self, relocations: Iterable[Relocation]) -> int:
        """Point this instance's requests at the new homes of moved rBlocks; returns how many
        rBlocks moved. A shared rBlock (the samples of one request) moves for every holder."""
        moves = {r.old: r.new for r in relocations}
        moved = set()
        for request in self.scheduler.requests.values():
            for index, ref in enumerate(request.block_table):
                new = moves.get(ref)
                if new is not None:
                    request.block_table.replace(index, new)
                    moved.add(ref)
        self.scheduler.allocator.shared.relocate(moves)
        if self.scheduler.allocator.prefix is not None:
            self.scheduler.allocator.prefix.relocate(moves)
        return len(moved)

    def drop_instance(self, dead_id: int) -> list[str]:
        """Another instance died with its pool: forget what it borrowed from us, and restart from
        their tokens (recompute) every request of ours that had rBlocks there; their ids."""
        return recovery.drop_instance(self.rmanager, self.scheduler, dead_id)

    def adopt_request(self, request: Request) -> None:
        """Take over a request whose home died: it restarts from its tokens (prompt + output)."""
        recovery.adopt(self.scheduler, self.instance_id, request)
