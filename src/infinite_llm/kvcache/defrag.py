"""Debt-graph defragmentation: plans that bring borrowed rBlocks home to restore locality.

The debt graph has an edge D -> C weighted by the rBlocks C lent to D (C hosts that many
rBlocks of D's requests). An instance's *usage* is the slots occupied in its own pool: its
own requests' local blocks plus the blocks it lent. The paper (v1) restores locality with
cycles in this graph but is silent on the procedure; this is our reading, made exact.

Cycle swap. For a cycle X0 -> X1 -> ... -> X(k-1) -> X0 (each Xi borrows from X(i+1)) and
w = the smallest weight on it, pick for every i a set S_i of w slots on X(i+1) that hold
rBlocks of Xi's requests. Then, for every i at once::

    Xi's data in S_i (on X(i+1))  --copy-->  S_(i-1) (on Xi, it held X(i-1)'s data)
    Xi repossesses S_(i-1): LENT to X(i-1) -> USED by Xi   (RManager.repossess)
    Xi forgets S_i as borrowed                              (RManager.record_returned)

    example, w=1:  A -> B -> C -> A
      before: B hosts a1 (A's), C hosts b1 (B's), A hosts c1 (C's)
      after:  A hosts a1,       B hosts b1,       C hosts c1

Every slot stays occupied (no free block is needed anywhere, even in a full cluster), each
instance's usage is unchanged (w of its LENT slots become USED), every edge on the cycle
loses w (at least one reaches 0, so the cycle is broken) and the cluster holds k*w fewer
remote rBlocks. The slots of one swap form a ring: the executor reads every source before
writing any destination (or rotates through one staging block). Cycles are cancelled one
after another on the residual graph until it is acyclic, in a deterministic order.

Repatriation. A debtor D with free local blocks brings n of its rBlocks home from creditor
C: D allocates n local blocks, copies, C reclaims the n slots, D forgets them as borrowed.
D's usage rises by n and C's falls by n (the total is unchanged); remote rBlocks fall by n.
Per debtor, the smallest debts go first, so whole edges vanish and requests span fewer
instances (fewer remote MicroAttentions per step); slots a move frees on its creditor count
toward that creditor's own repatriations later in the plan.

Promotion (memory tiers, ``kvcache.tiers``). What is still borrowed after that, from a pool of
a slower tier (a memory instance, a host pool), moves to one of a faster tier with room (a
model instance's pool, not the debtor's own: that was repatriation): the faster creditor lends
n slots, the data is copied, the slower one reclaims its n. Remote rBlocks stay as many; each
moves up a tier. Fastest targets first, then most room.

Plans are data; ``migration.py`` executes them on in-process managers, ``cluster/`` on
remote ones. Requests whose rBlocks move must not run a step while their move executes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from infinite_llm.kvcache.ledger import DebtLedger, Edge, edges_of


@dataclass(frozen=True, slots=True)
class Move:
    """The debtor takes ``num_blocks`` of its rBlocks home from the creditor."""

    debtor_id: int
    creditor_id: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class CycleSwap:
    """Along ``instance_ids`` (each borrows from the next, the last from the first), every
    instance takes ``num_blocks`` of its rBlocks home into slots it lent to its predecessor."""

    instance_ids: tuple[int, ...]
    num_blocks: int

    def edges(self) -> list[Edge]:
        ids = self.instance_ids
        return [(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))]

    def moves(self) -> tuple[Move, ...]:
        return tuple(Move(d, c, self.num_blocks) for d, c in self.edges())


@dataclass(frozen=True, slots=True)
class Promotion:
    """The debtor's ``num_blocks`` rBlocks on ``from_id`` move to ``to_id``, a faster tier."""

    debtor_id: int
    from_id: int
    to_id: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class DefragPlan:
    """Cycle swaps first, then repatriations, then promotions, each in order."""

    swaps: tuple[CycleSwap, ...] = ()
    repatriations: tuple[Move, ...] = ()
    promotions: tuple[Promotion, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.swaps and not self.repatriations and not self.promotions

    @property
    def num_remote_blocks_removed(self) -> int:
        return sum(len(s.instance_ids) * s.num_blocks for s in self.swaps) + sum(
            m.num_blocks for m in self.repatriations
        )

    def moves(self) -> tuple[Move, ...]:
        """Every debt reduction of the plan, in order."""
        return tuple(m for s in self.swaps for m in s.moves()) + self.repatriations

    def apply_to_edges(self, source: DebtLedger | Mapping[Edge, int]) -> dict[Edge, int]:
        """The debt graph after the plan; ValueError if a move exceeds its edge."""
        edges = edges_of(source)
        for m in self.moves():
            left = edges.get((m.debtor_id, m.creditor_id), 0) - m.num_blocks
            if m.num_blocks <= 0 or left < 0:
                raise ValueError(f"{m} does not fit the debt graph")
            edges[(m.debtor_id, m.creditor_id)] = left
        for p in self.promotions:
            left = edges.get((p.debtor_id, p.from_id), 0) - p.num_blocks
            if p.num_blocks <= 0 or left < 0:
                raise ValueError(f"{p} does not fit the debt graph")
            edges[(p.debtor_id, p.from_id)] = left
            edges[(p.debtor_id, p.to_id)] = edges.get((p.debtor_id, p.to_id), 0) + p.num_blocks
        return {e: n for e, n in edges.items() if n > 0}

    def usage_delta(self) -> dict[int, int]:
        """instance_id -> change in slots occupied in its pool (swaps change nothing)."""
        delta: dict[int, int] = {}
        for m in self.repatriations:
            delta[m.debtor_id] = delta.get(m.debtor_id, 0) + m.num_blocks
            delta[m.creditor_id] = delta.get(m.creditor_id, 0) - m.num_blocks
        return {i: d for i, d in delta.items() if d}


def debt_graph(source: DebtLedger | Mapping[Edge, int]) -> dict[int, dict[int, int]]:
    """debtor_id -> {creditor_id: rBlocks lent}."""
    graph: dict[int, dict[int, int]] = {}
    for (d, c), n in edges_of(source).items():
        graph.setdefault(d, {})[c] = n
    return graph


def find_cycle(source: DebtLedger | Mapping[Edge, int]) -> tuple[int, ...] | None:
    """One cycle of the debt graph (each borrows from the next), or None if acyclic."""
    swaps = _cancel_cycles(edges_of(source), first_only=True)
    return swaps[0].instance_ids if swaps else None


def plan_cycle_swaps(source: DebtLedger | Mapping[Edge, int]) -> tuple[CycleSwap, ...]:
    """Cancel cycles until the debt graph is acyclic; the swaps, in execution order."""
    return tuple(_cancel_cycles(edges_of(source), first_only=False))


def plan_repatriation(
    free_blocks: Mapping[int, int],
    source: DebtLedger | Mapping[Edge, int],
    *,
    reserve_blocks: int = 0,
) -> tuple[Move, ...]:
    """Debtors with more than ``reserve_blocks`` free blocks bring remote rBlocks home,
    smallest debts first. A move frees slots on its creditor, which may then bring its own
    rBlocks home in a later move: passes repeat until nothing changes (each move shrinks the
    debt, so this ends). Execute the moves in order."""
    graph = debt_graph(source)
    free = dict(free_blocks)
    moves = []
    changed = True
    while changed:
        changed = False
        for debtor_id in sorted(graph):
            budget = free.get(debtor_id, 0) - reserve_blocks
            debts = graph[debtor_id]
            for creditor_id, n in sorted(debts.items(), key=lambda e: (e[1], e[0])):
                if budget <= 0:
                    break
                if n == 0:
                    continue
                take = min(n, budget)
                moves.append(Move(debtor_id, creditor_id, take))
                budget -= take
                debts[creditor_id] -= take
                free[debtor_id] = free.get(debtor_id, 0) - take
                free[creditor_id] = free.get(creditor_id, 0) + take
                changed = True
    return tuple(moves)


def plan_promotions(
    source: DebtLedger | Mapping[Edge, int],
    tiers: Mapping[int, int],
    lendable: Mapping[int, int],
) -> tuple[Promotion, ...]:
    """Debts to a slower tier move to faster-tier creditors with room (``lendable``; never the
    debtor itself), fastest target first, then most room; debts in (debtor, creditor) order."""
    room = {i: n for i, n in lendable.items() if n > 0}
    promotions = []
    for (debtor_id, from_id), n in sorted(edges_of(source).items()):
        for to_id in sorted(room, key=lambda i: (tiers.get(i, 0), -room[i], i)):
            if n == 0:
                break
            if to_id in (debtor_id, from_id) or tiers.get(to_id, 0) >= tiers.get(from_id, 0):
                continue
            take = min(n, room[to_id])
            if take <= 0:
                continue
            promotions.append(Promotion(debtor_id, from_id, to_id, take))
            room[to_id] -= take
            n -= take
    return tuple(promotions)


def plan_defragmentation(
    source: DebtLedger | Mapping[Edge, int],
    *,
    free_blocks: Mapping[int, int] | None = None,
    reserve_blocks: int = 0,
    tiers: Mapping[int, int] | None = None,
    lendable: Mapping[int, int] | None = None,
) -> DefragPlan:
    """Cycle swaps on the debt graph, then (given free blocks) repatriation of what is left,
    then (given ``tiers`` and ``lendable``) promotion of what is still on a slower tier.

    Swaps need no free memory and leave free counts unchanged, so the same free counts
    plan the repatriations on the residual graph. Promotions use the creditors' lendable room
    less what the repatriations before them took.
    """
    swaps = plan_cycle_swaps(source)
    repatriations: tuple[Move, ...] = ()
    promotions: tuple[Promotion, ...] = ()
    if free_blocks is not None:
        residual = DefragPlan(swaps).apply_to_edges(source)
        repatriations = plan_repatriation(free_blocks, residual, reserve_blocks=reserve_blocks)
        if tiers and lendable is not None and len(set(tiers.values())) > 1:
            plan = DefragPlan(swaps, repatriations)
            room = dict(lendable)
            for debtor_id, n in plan.usage_delta().items():
                room[debtor_id] = room.get(debtor_id, 0) - max(0, n)
            promotions = plan_promotions(plan.apply_to_edges(source), tiers, room)
    return DefragPlan(swaps, repatriations, promotions)


def _cancel_cycles(edges: dict[Edge, int], *, first_only: bool) -> list[CycleSwap]:
    """Walk a path through positive edges; on reaching a node already on the path, cancel
    that cycle by its smallest weight and cut the path back to the tail of the first edge it
    emptied. Nodes with no way forward are done for good (weights only fall), so the walk is
    O(V + E + total cycle length). Successors are tried in id order: deterministic."""
    succ: dict[int, list[int]] = {}
    for d, c in sorted(edges):
        succ.setdefault(d, []).append(c)
    cursor = dict.fromkeys(succ, 0)
    done: set[int] = set()
    swaps: list[CycleSwap] = []
    for start in sorted(succ):
        if start in done:
            continue
        path, pos = [start], {start: 0}
        while path:
            u = path[-1]
            nexts = succ.get(u, [])
            i = cursor.get(u, 0)
            while i < len(nexts) and (edges[(u, nexts[i])] == 0 or nexts[i] in done):
                i += 1
            cursor[u] = i
            if i == len(nexts):
                done.add(u)
                path.pop()
                del pos[u]
                continue
            v = nexts[i]
            if v not in pos:
                pos[v] = len(path)
                path.append(v)
                continue
            ring = path[pos[v] :]
            ring_edges = [(ring[j], ring[(j + 1) % len(ring)]) for j in range(len(ring))]
            w = min(edges[e] for e in ring_edges)
            k = ring.index(min(ring))  # canonical rotation: smallest id first
            swaps.append(CycleSwap(tuple(ring[k:] + ring[:k]), w))
            if first_only:
                return swaps
            for e in ring_edges:
                edges[e] -= w
            cut = next(j for j, e in enumerate(ring_edges) if edges[e] == 0)
            for node in path[pos[v] + cut + 1 :]:
                del pos[node]
            del path[pos[v] + cut + 1 :]
    return swaps
