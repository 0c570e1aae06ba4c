"""The cluster-wide order of a borrowing cluster's schedulers (``scheduler`` module docstring,
*Rank*): each scheduler reports three ranks of its last step, is told the same three of the
other instances, and asks the gManager for a prefill claim before it starts a request longer
than its home pool.

Memory is one pool, so the order must hold across instances, or instances starve each other
(each preempts its own request, re-admits it into the pool it just freed, and none ever gets
past its home pool). The cluster passes each scheduler three facts about the other instances,
from their last steps (``grant_right_of_way``, ``cluster_order``):

* ``right_of_way``: the oldest rank waiting for memory elsewhere (stalled, or at the head of
  a queue that memory kept out). Nothing younger is admitted here meanwhile.
* ``prefill_way``: the oldest rank prefilling past its home pool elsewhere. Nothing younger is
  admitted here meanwhile unless it fits this pool's free rBlocks (it borrows nothing). If the
  memory it takes is what the prefill needed next, that request stalls and ``right_of_way``
  holds everything back until memory returns.
* ``youngest_elsewhere``: the youngest running request elsewhere. A request that runs out of
  memory and is the youngest here preempts itself only if it is also the youngest in the
  cluster; otherwise it keeps its rBlocks and stalls (``blocked_rank`` reports it) until
  memory comes back, while the youngest requests give theirs up.

Last steps' reports lag: on Ray the instances step at the same time, so two requests longer
than their pools, queued on two instances, would both start in one round, neither seeing the
other, prefill side by side and preempt each other. Who starts one is therefore decided in one
place, at once: the gManager's prefill claims (``GManager.claim_prefill``, through the
scheduler's allocator). A request longer than its home pool is admitted only with a claim, and
a claim is granted while no other instance holds one (the instance that holds it may start
more), so one instance at a time prefills past its pool. Each scheduler syncs its claims to
the requests still prefilling past their pool at the end of every step (``sync_prefills``),
and a request that would borrow also yields to the oldest claim held elsewhere now
(``prefill_way()``), besides the reported ``prefill_way``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeAlias

from infinite_llm.kvcache.claims import Rank  # (fits the home pool: 1 else 0, arrival_seq)

__all__ = ["OrderReport", "Ordered", "Rank", "cluster_order", "grant_right_of_way"]
# What a scheduler reports of its step and what the cluster tells it of the others:
# (blocked, youngest running, prefilling past its home pool) ranks, and back
# (``right_of_way``, ``youngest_elsewhere``, ``prefill_way``).
OrderReport: TypeAlias = tuple[Rank | None, Rank | None, Rank | None]


class Ordered(Protocol):
    """What ``grant_right_of_way`` needs of a scheduler."""

    @property
    def order_report(self) -> OrderReport: ...

    def set_cluster_order(self, told: OrderReport) -> None: ...


def grant_right_of_way(schedulers: Mapping[int, Ordered]) -> None:
    """Tell every scheduler of a borrowing cluster what the others reported at their last step
    (``right_of_way``, ``youngest_elsewhere``, ``prefill_way``; ``scheduler`` module docstring)."""
    reports = {i: s.order_report for i, s in schedulers.items()}
    for i, told in cluster_order(reports).items():
        schedulers[i].set_cluster_order(told)


def cluster_order(reports: Mapping[int, OrderReport]) -> dict[int, OrderReport]:
    """Per instance, from every instance's ``(blocked_rank, youngest_rank, prefilling_rank)``:
    the oldest blocked, the youngest running and the oldest prefilling-past-its-pool request on
    the *other* instances."""
    out: dict[int, OrderReport] = {}
    for i in reports:
        others = [r for j, r in reports.items() if j != i]
        out[i] = (
            min((b for b, _, _ in others if b is not None), default=None),
            max((y for _, y, _ in others if y is not None), default=None),
            min((p for _, _, p in others if p is not None), default=None),
        )
    return out
