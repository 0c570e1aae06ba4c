"""The borrowing protocol between rManagers and the gManager, as plain picklable messages.

One borrow, as the paper describes it (the gManager recommends, it never allocates)::

    debtor --BorrowQuery------> gManager      "who can lend me n rBlocks?"
    debtor <--Recommendation--- gManager      ranked creditor ids (a hint, maybe stale)
    debtor --LendRequest------> creditor      all-or-nothing, first come first served
    debtor <--LendReply-------- creditor      the granted BlockRefs, or false (granted=None)
    debtor --Release----------> creditor      later: give the rBlocks back
    every rManager --Heartbeat--> gManager    regularly: free/lent/borrowed counts

A ``LendRequest`` with ``hashes`` asks for cached rBlocks by content (the prefix cache): the
creditor lends those it keeps free with that KV, the longest leading run of them.

Only ``cluster/`` moves these between processes; everything here is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.kvcache.block import BlockRef


@dataclass(frozen=True, slots=True)
class BorrowQuery:
    """A debtor asks the gManager which instances could lend it ``num_blocks`` rBlocks."""

    debtor_id: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The gManager's answer: candidate creditors, best first. A hint, not a grant.

    ``creditor_ids`` are estimated to hold all ``num_blocks`` each. When no single instance
    can, ``split`` may propose ``(creditor_id, num_blocks)`` shares summing to ``num_blocks``
    (the debtor then asks each share all-or-nothing). Both empty: nobody can lend now.
    """

    debtor_id: int
    num_blocks: int
    creditor_ids: tuple[int, ...] = ()
    split: tuple[tuple[int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.creditor_ids and not self.split


@dataclass(frozen=True, slots=True)
class LendRequest:
    """A debtor asks one creditor for exactly ``num_blocks`` rBlocks (never fewer).

    With ``hashes`` (``num_blocks`` of them, one per rBlock of a prompt's prefix): the rBlocks
    the creditor keeps cached with that content, the longest leading run of them (maybe
    none: a stale index entry), so the debtor attends them in place instead of computing them.
    """

    debtor_id: int
    num_blocks: int
    request_id: int = 0
    hashes: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class LendReply:
    """A creditor's answer to one ``LendRequest``.

    ``granted`` holds exactly the requested number of refs on the creditor, or is ``None``
    (the paper's "false"). ``num_lendable`` is what the creditor could still lend after
    answering, so a false also tells the gManager how much room there really is.
    """

    creditor_id: int
    debtor_id: int
    request_id: int
    granted: list[BlockRef] | None
    num_lendable: int = 0

    @property
    def ok(self) -> bool:
        return self.granted is not None


@dataclass(frozen=True, slots=True)
class Release:
    """A debtor gives rBlocks back to the creditor that lent them (all refs name it).

    ``hashes``, when given, has one entry per ref: the content hash of a full rBlock whose KV
    the creditor may keep cached (``FreeBlocks``), or None."""

    debtor_id: int
    refs: list[BlockRef]
    hashes: tuple[bytes | None, ...] = ()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An rManager's regular report to the gManager.

    The per-peer counts let a restarted gManager rebuild the whole debt ledger from one
    round of heartbeats: ``lent_to[debtor_id]`` on the creditor is the authority, and
    ``borrowed_from[creditor_id]`` on the debtor is the cross-check. ``num_cached`` of the
    free rBlocks keep a prefix's KV; ``prefix_added`` / ``prefix_removed``: the content hashes
    the instance began / stopped serving since its last heartbeat (``kvcache.prefix_index``).
    """

    instance_id: int
    seq: int
    num_blocks: int
    num_free: int
    num_used: int
    num_lent: int
    num_borrowed: int
    lendable: int
    lent_to: dict[int, int] = field(default_factory=dict)
    borrowed_from: dict[int, int] = field(default_factory=dict)
    num_cached: int = 0
    prefix_added: tuple[bytes, ...] = ()
    # The pool's memory tier (``kvcache.tiers.Tier``) and, for a host pool, its model instance.
    tier: int = 0
    host_of: int | None = None
    prefix_removed: tuple[bytes, ...] = ()
