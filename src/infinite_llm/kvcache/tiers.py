"""Memory tiers: where a pool's rBlocks live, fastest first.

``DEVICE``: a model instance's own pool (GPU memory on a GPU; RAM on a CPU-only machine).
``HOST``: a model instance's second pool in its host's memory (``--host-kv-memory``), its
MicroAttention run by the host's cores. ``MEMORY``: a memory instance's pool (a process with
a pool and MicroAttention, no weights; ``--memory-instances``).

The gManager's recommendations prefer the faster tier while it has room (a debtor's own host
pool first within the host tier: it is on the debtor's machine) and fall back to the next;
repatriation brings borrowed rBlocks home, to the top tier, when the home pool has room.
"""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    DEVICE = 0
    HOST = 1
    MEMORY = 2

    @property
    def label(self) -> str:
        return self.name.lower()
