"""Parallel sampling in the scheduler: the samples of one request (same ``Request.parent_id``,
all homed on one instance) share the prompt's full rBlocks, reference counted by the allocator
(``kvcache.shared``).

The first sample is admitted as any request; the others wait in the queue until a running
sample has computed those rBlocks, then each holds them too and gets its own rBlock for the rest
of the prompt, which it recomputes (at most one rBlock of tokens; vLLM's fan-out over its prefix
cache does the same), so each sample's first token comes from its own logits and no KV is copied
between pools (the partial rBlock may be on another instance). A preempted sample frees only
what it alone holds and comes back the same way (alone when no sibling runs).
"""

from __future__ import annotations

from collections.abc import Iterable

from infinite_llm.scheduler.allocator import BlockAllocator
from infinite_llm.scheduler.request import Request


class _Prefilling:
    """``prompt_source``'s answer while a sibling sample computes the shared prompt."""


PREFILLING = _Prefilling()


def num_shared_tokens(request: Request, block_size: int) -> int:
    """Prompt tokens whose rBlocks the samples of one request share: every full rBlock of the
    prompt but the one holding its last token, which each sample computes itself (to get its
    own logits)."""
    return (request.num_prompt_tokens - 1) // block_size * block_size


def prompt_source(
    request: Request, running: Iterable[Request], block_size: int
) -> Request | _Prefilling | None:
    """For a sample of a parallel-sampling request: a running sample of the same parent whose
    prompt's shared rBlocks are computed (``admit`` shares them), or ``PREFILLING`` while one
    still computes them (this one waits for it, so the prompt is computed once); None: admitted
    on its own rBlocks (no sibling runs here: it is the first sample, the others were preempted
    or finished, or the prompt fills no rBlock)."""
    if request.parent_id is None:
        return None
    num_shared = num_shared_tokens(request, block_size)
    if num_shared == 0:
        return None
    prefilling = False
    for other in running:
        if other.parent_id == request.parent_id:
            if other.num_computed_tokens >= num_shared:
                return other
            prefilling = True
    return PREFILLING if prefilling else None


def admit(request: Request, source: Request, allocator: BlockAllocator, block_size: int) -> bool:
    """Admit a sample on the prompt rBlocks ``source`` (a sibling) computed: it holds them too
    (``allocator.shared``) and gets its own rBlocks from the prompt's last partial rBlock on,
    where it recomputes the rest of the prompt (at most one rBlock of tokens; after a
    preemption, its output too). False, holding nothing, when its own rBlocks are not free."""
    num_shared = num_shared_tokens(request, block_size)
    shared = source.block_table.refs()[: num_shared // block_size]
    own = allocator.allocate(-(-request.num_tokens // block_size) - len(shared))
    if own is None:
        return False
    allocator.shared.share(shared)
    request.block_table.append(shared)
    request.block_table.append(own)
    request.num_computed_tokens = num_shared
    return True
