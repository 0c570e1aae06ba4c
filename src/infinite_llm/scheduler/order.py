"""The cluster-wide order of a borrowing cluster's schedulers (``scheduler`` module docstring,
*Rank* and the paragraphs after it): each scheduler reports three ranks of its last step, and
each is told the same three of the other instances."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeAlias

Rank: TypeAlias = tuple[int, int]  # (1 if the prompt fits the home pool else 0, arrival_seq)
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
