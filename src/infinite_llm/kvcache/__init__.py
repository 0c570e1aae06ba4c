"""Pure-Python KV-cache bookkeeping: rBlocks, RManager, GManager, debt ledger, defragmentation.

Nothing here imports torch: the engine and the simulator share this code.
"""
