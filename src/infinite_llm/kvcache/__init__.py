"""Pure-Python KV-cache bookkeeping: rBlocks, RManager, GManager, debt ledger, defragmentation.

Nothing here imports torch: the engine and the simulator share this code.
"""

from infinite_llm.kvcache.block import BlockRef, BlockTable
from infinite_llm.kvcache.borrow import BorrowConfig, Borrower, GManagerLike, borrow, release
from infinite_llm.kvcache.defrag import (
    CycleSwap,
    DefragPlan,
    Move,
    debt_graph,
    find_cycle,
    plan_cycle_swaps,
    plan_defragmentation,
    plan_repatriation,
)
from infinite_llm.kvcache.gmanager import GManager, GManagerConfig, GManagerStats
from infinite_llm.kvcache.ledger import DebtLedger
from infinite_llm.kvcache.messages import (
    BorrowQuery,
    Heartbeat,
    LendReply,
    LendRequest,
    Recommendation,
    Release,
)
from infinite_llm.kvcache.metrics import BorrowStats, LocalityReport, locality
from infinite_llm.kvcache.migration import Relocation, execute_plan
from infinite_llm.kvcache.rmanager import RManager, RManagerConfig

__all__ = [
    "BlockRef",
    "BlockTable",
    "BorrowConfig",
    "BorrowQuery",
    "BorrowStats",
    "Borrower",
    "CycleSwap",
    "DebtLedger",
    "DefragPlan",
    "GManager",
    "GManagerConfig",
    "GManagerLike",
    "GManagerStats",
    "Heartbeat",
    "LendReply",
    "LendRequest",
    "LocalityReport",
    "Move",
    "RManager",
    "RManagerConfig",
    "Recommendation",
    "Release",
    "Relocation",
    "borrow",
    "debt_graph",
    "execute_plan",
    "find_cycle",
    "locality",
    "plan_cycle_swaps",
    "plan_defragmentation",
    "plan_repatriation",
    "release",
]
