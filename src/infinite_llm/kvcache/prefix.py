"""The prefix cache, as one instance's requests see it: reuse rBlocks that already hold the KV
of a prompt's leading tokens, wherever in the cluster they are.

A full rBlock is named by a hash chained over its tokens and its prefix's hash (vLLM's scheme),
so equal hashes mean equal KV: the K,V of a token depend only on the tokens up to it. The
chain is BLAKE2b-128 over the parent's digest and the block's token ids; it is the same in
every process (no per-process salt, unlike ``hash()`` of bytes), so instances on other
processes and machines agree on it.

``PrefixCache`` belongs to an instance's block allocator, beside ``SharedBlocks`` (which counts
how many of the instance's requests hold each rBlock)::

    held      hash -> BlockRef for the full rBlocks its requests hold (local or borrowed),
              registered once computed (``register``); a new request shares them.
    lookup    a new request's leading full rBlocks, each from the first place that has it:
                1. held here (shared: one more holder),
                2. cached in the home pool (``RManager.take_cached``),
                3. cached in another instance's pool, lent in place (``remote``: the gManager's
                   prefix index says where; the owner lends what it still has; DistAttention
                   attends it there like any borrowed rBlock: no KV is copied);
              stopping at the first miss. The block holding the prompt's last token is never
              reused (its logits are needed), nor any prompt that asks for prompt logprobs.
    forget    an rBlock's last holder here let go: its hash rides with the free (local) or
              the ``Release`` (borrowed), and the owner keeps it cached (``FreeBlocks``).

Not thread-safe: the instance's scheduler (and, between steps, migration and failure
handling) use it, like ``SharedBlocks``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.shared import SharedBlocks

RemoteHits = Callable[[list[bytes]], list[BlockRef]]


def chain_hash(parent: bytes, token_ids: Iterable[int]) -> bytes:
    """The hash of a full rBlock holding ``token_ids`` after the prefix hashed to ``parent``."""
    tokens = list(token_ids)
    return hashlib.blake2b(
        parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16
    ).digest()


def block_hashes(request: Any, num_blocks: int, block_size: int) -> list[bytes]:
    """The hashes of ``request``'s first ``num_blocks`` full rBlocks of prompt + output,
    computed once per request (``request.block_hashes`` grows as its tokens do)."""
    hashes: list[bytes] = request.block_hashes
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else b""
        hashes.append(chain_hash(parent, request.token_ids(i * block_size, (i + 1) * block_size)))
    return hashes[:num_blocks]


def prefix_counters(cache: PrefixCache | None) -> dict[str, int]:
    """``cache``'s counters under vLLM's metric names, as every cluster's ``stats()`` reports
    them per instance (0 when prefix caching is off)."""
    return {
        "prefix_cache_queries": cache.num_queries if cache is not None else 0,
        "prefix_cache_hits": cache.num_hits if cache is not None else 0,
    }


class PrefixCache:
    """One instance's view of the prefix cache (module docstring). ``rmanager`` is the home
    pool's; ``remote``, where the instance borrows, gets cached rBlocks from other instances
    (``Borrower.borrow_cached``)."""

    def __init__(self, rmanager: Any, block_size: int, remote: RemoteHits | None = None) -> None:
        self.rmanager = rmanager
        self.block_size = block_size
        self.remote = remote
        self.held: dict[bytes, BlockRef] = {}
        self.hash_of: dict[BlockRef, bytes] = {}
        # vLLM's counters: prompt tokens looked up at admission, and how many were found.
        self.num_queries = 0
        self.num_hits = 0

    def lookup(self, request: Any, shared: SharedBlocks) -> list[BlockRef]:
        """The rBlocks now holding ``request``'s leading full rBlocks' KV, each held for it
        (``shared`` counts one more holder of those already held here)."""
        if request.sampling_params.prompt_logprobs is not None:
            return []
        num_blocks = (request.num_tokens - 1) // self.block_size
        hashes = block_hashes(request, num_blocks, self.block_size)
        refs: list[BlockRef] = []
        while len(refs) < num_blocks:
            rest = hashes[len(refs) :]
            ref = self.held.get(rest[0])
            if ref is not None:
                shared.share([ref])
                refs.append(ref)
                continue
            got = self.rmanager.take_cached(rest)
            if not got and self.remote is not None:
                got = self.remote(rest)
            if not got:
                break
            for ref, h in zip(got, rest, strict=False):
                self._hold(ref, h)
            refs += got
        return refs

    def count(self, num_tokens: int, num_cached_tokens: int) -> None:
        """A request was admitted: ``num_tokens`` looked up, ``num_cached_tokens`` found."""
        self.num_queries += num_tokens
        self.num_hits += num_cached_tokens

    def register(self, request: Any) -> None:
        """Name ``request``'s full rBlocks computed since the last call, so later requests
        find them (one rBlock per content: a duplicate stays unnamed)."""
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(request.block_table))
        start = request.num_hashed_blocks
        if num_full <= start:
            return
        hashes = block_hashes(request, num_full, bs)
        for i in range(start, num_full):
            ref = request.block_table[i]
            if ref not in self.hash_of and hashes[i] not in self.held:
                self._hold(ref, hashes[i])
        request.num_hashed_blocks = num_full

    def forget(self, refs: Iterable[BlockRef]) -> list[bytes | None]:
        """rBlocks whose last holder here let go: their hashes (None: unnamed), one per ref,
        for the owner to keep them cached."""
        out = []
        for ref in refs:
            h = self.hash_of.pop(ref, None)
            if h is not None:
                del self.held[h]
                self.rmanager.unadvertise(h)
            out.append(h)
        return out

    def relocate(self, moves: Mapping[BlockRef, BlockRef]) -> None:
        """Named rBlocks whose data moved (defragmentation) keep their name at the new ref."""
        moved = {moves[ref]: h for ref, h in self.hash_of.items() if ref in moves}
        for ref in moves:
            self.hash_of.pop(ref, None)
        self.hash_of.update(moved)
        for ref, h in moved.items():
            self.held[h] = ref

    def drop_instance(self, dead_id: int) -> None:
        """``dead_id`` died with its pool: forget the names of rBlocks that were there."""
        self.forget([ref for ref in self.hash_of if ref.instance_id == dead_id])

    def check(self, tables: Iterable[Iterable[BlockRef]]) -> None:
        """Raise AssertionError unless every named rBlock is held by one of ``tables`` (the
        instance's requests' block tables) and the two maps agree."""
        held_refs = {ref for table in tables for ref in table}
        assert len(self.held) == len(self.hash_of), "prefix cache: maps differ in size"
        for ref, h in self.hash_of.items():
            assert self.held.get(h) == ref, f"prefix cache: {ref}'s hash names {self.held.get(h)}"
            assert ref in held_refs, f"prefix cache: {ref} is named but no request holds it"

    def _hold(self, ref: BlockRef, block_hash: bytes) -> None:
        if block_hash in self.held:
            return  # another rBlock here has that content: this one stays unnamed
        self.hash_of[ref] = block_hash
        self.held[block_hash] = ref
        self.rmanager.advertise(block_hash)
