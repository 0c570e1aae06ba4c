"""Prefill claims: which instance may prefill a request longer than its home pool now.

The one decision of the schedulers' cluster-wide order (``scheduler.order``) taken at once, in
one place, instead of from the others' last steps: on Ray the instances step at the same time,
and two such requests started in one round would prefill side by side, run out of memory
together and preempt each other. A claim is granted while no other instance holds one,
whatever the ranks: the instance that holds one may start more, and every other waits until
its claims are synced away (``sync``: the requests still prefilling past their pool there).
Claims are not in heartbeats: a restarted gManager starts with none, and the schedulers, which
sync theirs every step while they hold any, bring them back. Nothing here is thread-safe; the
``GManager`` holding it takes the lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

Rank: TypeAlias = tuple[int, int]  # (1 if the prompt fits the home pool else 0, arrival_seq)


class PrefillClaims:
    """instance_id -> the ranks of the requests prefilling past their home pool there."""

    def __init__(self) -> None:
        self._held: dict[int, set[Rank]] = {}

    def claim(self, instance_id: int, rank: Rank) -> bool:
        """Grant (and hold) ``rank`` for ``instance_id`` unless another instance holds a claim;
        a claim already held is granted again."""
        held = self._held.get(instance_id)
        if held is not None and rank in held:
            return True
        if any(i != instance_id for i in self._held):
            return False
        self._held.setdefault(instance_id, set()).add(rank)
        return True

    def sync(self, instance_id: int, ranks: Iterable[Rank]) -> None:
        """``instance_id``'s claims are exactly ``ranks`` from now on."""
        held = set(ranks)
        if held:
            self._held[instance_id] = held
        else:
            self._held.pop(instance_id, None)

    def way(self, instance_id: int) -> Rank | None:
        """The oldest claim held by another instance than ``instance_id`` (None: none)."""
        return min((min(h) for i, h in self._held.items() if i != instance_id), default=None)

    def forget_instance(self, instance_id: int) -> None:
        self._held.pop(instance_id, None)

    def reset(self) -> None:
        self._held.clear()

    def check_integrity(self) -> None:
        for i, held in self._held.items():
            assert held, f"claims: an empty set of prefill claims kept for {i}"
