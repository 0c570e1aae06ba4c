"""What an instance does when another one fails, on its RManager and scheduler: forget the
dead instance's debts and recompute the requests that had rBlocks there; take over a request
homed on the dead one. Shared by ``engine.Instance`` and the simulator's instances."""

from __future__ import annotations

from typing import Any

from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler


def drop_instance(rmanager: Any, scheduler: Scheduler, dead_id: int) -> list[str]:
    """Forget what ``dead_id`` borrowed from this pool and what this instance borrowed from it,
    and restart from their tokens (recompute) the requests here that had rBlocks there; their
    ids."""
    rmanager.reclaim_all(dead_id)
    rmanager.drop_borrowed_from(dead_id)
    lost = []
    for request in list(scheduler.running):
        if request.block_table.num_blocks_on(dead_id):
            gone = request.block_table.remove_instance(dead_id)  # that memory is gone
            scheduler.allocator.shared.release(gone)  # nothing to free there; free the rest
            scheduler.preempt(request)
            lost.append(request.request_id)
    if scheduler.allocator.prefix is not None:
        scheduler.allocator.prefix.drop_instance(dead_id)  # no request holds them now
    return lost


def adopt(scheduler: Scheduler, instance_id: int, request: Request) -> None:
    """Take over a request whose home died: it restarts from its tokens (prompt + output)."""
    request.block_table.clear()
    request.num_computed_tokens = 0
    request.status = RequestStatus.WAITING
    request.num_preemptions += 1
    request.home_instance_id = instance_id
    scheduler.add_request(request)
