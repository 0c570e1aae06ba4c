"""Where each request's rBlocks live, kept up to date in O(new blocks) per step.

The simulator must cost a step without walking every block table (a 2M-token request has
125K rBlocks). ``PlacementTracker`` keeps, per request, how many of its rBlocks sit on each
instance, looking only at the blocks appended since it last looked; a preemption (the table
was cleared) starts the count over. It also indexes every *borrowed* rBlock, so the
defragmentation's relocations (which only ever move borrowed rBlocks) update block tables
in O(moved blocks) instead of scanning every request the way ``Instance.relocate`` does.

``step_work`` turns a ``SchedulerOutput`` into the ``StepWork`` a cost model prices. The real
benchmark uses the same function with counts taken from the full block tables, so the
features fitted on real runs are computed exactly as the simulator computes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.migration import Relocation
from infinite_llm.scheduler.output import SchedulerOutput
from infinite_llm.scheduler.request import Request
from infinite_llm.sim.costs import ShardLoad, StepWork

Counts = Callable[[Request], Mapping[int, int]]


def full_counts(request: Request) -> Counter[int]:
    """instance_id -> rBlocks of the request there, by walking its whole block table."""
    return Counter(ref.instance_id for ref in request.block_table)


class PlacementTracker:
    """Per request: rBlocks per instance, plus an index of borrowed rBlocks for relocation."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[int, int]] = {}
        self._seen: dict[str, int] = {}  # request_id -> block-table length already counted
        self._borrowed: dict[BlockRef, tuple[Request, int]] = {}  # ref -> (request, index)
        self._borrowed_of: dict[str, list[BlockRef]] = {}

    def counts(self, request: Request) -> dict[int, int]:
        """Bring the request's counts up to date (only new blocks are looked at) and return them."""
        rid, table = request.request_id, request.block_table
        num_blocks = len(table)
        seen = self._seen.get(rid, 0)
        if num_blocks == seen and rid in self._counts:  # the common decode step: nothing new
            return self._counts[rid]
        if num_blocks < seen:  # cleared behind our back: start over
            self.forget(request)
            seen = 0
        counts = self._counts.setdefault(rid, {})
        home = request.home_instance_id
        for index in range(seen, num_blocks):
            ref = table[index]
            counts[ref.instance_id] = counts.get(ref.instance_id, 0) + 1
            if ref.instance_id != home:
                self._borrowed[ref] = (request, index)
                self._borrowed_of.setdefault(rid, []).append(ref)
        self._seen[rid] = num_blocks
        return counts

    def forget(self, request: Request) -> None:
        """The request finished or was preempted: its rBlocks are gone."""
        rid = request.request_id
        self._counts.pop(rid, None)
        self._seen.pop(rid, None)
        for ref in self._borrowed_of.pop(rid, ()):
            entry = self._borrowed.get(ref)
            if entry is not None and entry[0] is request:
                del self._borrowed[ref]

    def relocate(self, relocations: Iterable[Relocation]) -> int:
        """Point block tables at the new homes of moved rBlocks; returns how many moved."""
        # A cycle swap's moves form a ring (one move's target is another's source): take every
        # source out of the index before putting any target in.
        entries = []
        for reloc in relocations:
            entry = self._borrowed.pop(reloc.old, None)
            if entry is None:
                raise KeyError(f"{reloc.old} is not a borrowed rBlock of any request")
            entries.append((reloc, entry))
        moved = 0
        for reloc, (request, index) in entries:
            request.block_table.replace(index, reloc.new)
            counts = self._counts[request.request_id]
            counts[reloc.old.instance_id] -= 1
            if not counts[reloc.old.instance_id]:
                del counts[reloc.old.instance_id]
            counts[reloc.new.instance_id] = counts.get(reloc.new.instance_id, 0) + 1
            if reloc.new.instance_id != request.home_instance_id:
                self._borrowed[reloc.new] = (request, index)
                self._borrowed_of[request.request_id].append(reloc.new)
            moved += 1
        return moved

    @property
    def num_borrowed_blocks(self) -> int:
        return len(self._borrowed)


def step_work(
    out: SchedulerOutput,
    home_id: int,
    block_size: int,
    counts: Counts = full_counts,
    num_borrow_messages: int = 0,
) -> StepWork:
    """The work of one step: tokens, samples, and per instance the context read and pairs.

    Context = tokens cached before the step (``num_computed_tokens``); the scheduler has
    already appended the rBlocks for the step's new tokens, so those tail blocks are taken
    out of the counts (O(new blocks)). The last context block may be partly filled.
    """
    rows: dict[int, int] = {}
    ctx: dict[int, int] = {}
    pairs: dict[int, int] = {}
    writes: dict[int, int] = {}
    num_new = num_samples = self_pairs = 0
    bs = block_size
    for item in out.scheduled:
        request, new = item.request, item.num_new_tokens
        table = request.block_table
        done = request.num_computed_tokens
        num_new += new
        num_samples += done + new == request.num_tokens  # item.samples, inlined
        self_pairs += new * (new + 1) // 2
        per_inst = counts(request)
        num_ctx_blocks = -(-done // bs)
        tail: dict[int, int] | None = (
            None  # blocks appended for this step's tokens, not context yet
        )
        for index in range(num_ctx_blocks, len(table)):
            tail = tail or {}
            inst = table[index].instance_id
            tail[inst] = tail.get(inst, 0) + 1
        if done:
            last = table[num_ctx_blocks - 1].instance_id
            deficit = num_ctx_blocks * bs - done
            for inst, nb in per_inst.items():
                if tail is not None:
                    nb -= tail.get(inst, 0)
                tokens = nb * bs - deficit if inst == last else nb * bs
                if tokens > 0:
                    if inst in ctx:
                        rows[inst] += new
                        ctx[inst] += tokens
                        pairs[inst] += new * tokens
                    else:
                        rows[inst], ctx[inst], pairs[inst] = new, tokens, new * tokens
        first, end = done // bs, (done + new - 1) // bs
        if first == end:  # the common decode case: one block
            inst = table[first].instance_id
            writes[inst] = writes.get(inst, 0) + new
            continue
        for index in range(first, end + 1):
            lo, hi = max(done, index * bs), min(done + new, (index + 1) * bs)
            inst = table[index].instance_id
            writes[inst] = writes.get(inst, 0) + hi - lo
    shards = tuple(
        ShardLoad(i, rows.get(i, 0), ctx.get(i, 0), pairs.get(i, 0), writes.get(i, 0))
        for i in sorted(set(ctx) | set(writes))
    )
    return StepWork(
        home_id, len(out.scheduled), num_new, num_samples, self_pairs, shards, num_borrow_messages
    )
