"""``KVPool``: one instance's physical rBlocks as tensors, every layer's K and V.

Layout per layer (K and V alike)::

    [num_kv_heads, num_blocks, block_size, head_dim]

so the tokens of a contiguous run of blocks form a strided [heads, tokens, head_dim] view that
the attention kernel reads without a gather. A token's slot is ``block_id * block_size + offset``.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch

from infinite_llm.attention.native_ops import kv_write_native


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pinned: bool = False,
    ) -> None:
        """``pinned``: a host pool (CPU) in page-locked memory, for a GPU instance's host tier:
        its queries and results cross to and from the GPU without a staging copy."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"a KV pool needs blocks (got num_blocks={num_blocks}, block_size={block_size})"
            )
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        # torch.empty commits pages only as blocks get written; unwritten slots are never read.
        if pinned:
            self.k = torch.empty(shape, dtype=dtype, pin_memory=True)
            self.v = torch.empty(shape, dtype=dtype, pin_memory=True)
        else:
            self.k = empty_kv(shape, dtype, device)
            self.v = empty_kv(shape, dtype, device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        return (
            2
            * num_layers
            * num_kv_heads
            * block_size
            * head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens: slots [n] int64; k, v [n, Hkv, D]."""
        write_layer(self.k[layer], self.v[layer], slots, k, v)

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of whole rBlocks (every layer): for migration. -> k, v [L, Hkv, n, bs, D]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        return self.k.index_select(2, index), self.v.index_select(2, index)

    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        index = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        self.k.index_copy_(2, index, k.to(self.k.device, self.dtype))
        self.v.index_copy_(2, index, v.to(self.v.device, self.dtype))


def write_layer(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store new tokens in one layer of a pool ([Hkv, num_blocks, block_size, D]): slots [n]
    int64; k, v [n, Hkv, D]. One C loop on CPU, ``index_copy_`` elsewhere."""
    if kv_write_native(k_cache, v_cache, slots, k, v):
        return
    h, d = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(h, -1, d).index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(h, -1, d).index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))


HUGE_PAGE = 2 << 20


def empty_kv(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``torch.empty`` for KV memory; on Linux CPU, memory of its own mapped for it, starting
    on a 2 MB boundary and advised as transparent huge pages (``madvise(MADV_HUGEPAGE)``)
    before anything touches it. rBlocks sit anywhere in a pool, so an MA touches a new 4 KB
    page every rBlock of a head; 2 MB pages keep those walks in the TLB (measured: decode MA
    over 128K shuffled tokens, 2 threads, cold caches, 16.4-19.3 GB/s against 14.6-16.2 GB/s
    on 4 KB pages). Memory is then committed 2 MB at a time as blocks get written.

    Why not advise what ``torch.empty`` returns: malloc's memory starts anywhere, so the partial
    2 MB pages at both ends stay 4 KB pages (a third of a 12 MB pool), and below malloc's mmap
    threshold (which grows after large frees) it is reused heap that already has 4 KB pages
    (measured, 32K tokens cut into four 12 MB shard pools: 67 % of their memory in huge pages,
    one run none for one of them, and the four MAs then took 11 % over one MA over the whole
    context, against 2-3 %).
    ``INFINITE_LLM_HUGEPAGES=0`` turns both off (plain ``torch.empty``)."""
    dev = torch.device(device)
    if dev.type == "cpu" and sys.platform.startswith("linux") and _hugepages_wanted():
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes >= HUGE_PAGE:
            return _huge_page_tensor(nbytes, dtype).view(shape)
    return torch.empty(shape, dtype=dtype, device=dev)


def _huge_page_tensor(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``nbytes`` over an anonymous mapping of its own, 2 MB aligned, advised
    as huge pages; the mapping is unmapped when the last tensor viewing it goes."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private (a shared anonymous mapping is shmem, which THP leaves alone); the extra 2 MB
    # lets the data start on a 2 MB boundary and is never touched
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # holds ``buf`` alive
    offset = -whole.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE, offset, size)
    return whole[offset : offset + nbytes].view(dtype)


def _hugepages_wanted() -> bool:
    return os.environ.get("INFINITE_LLM_HUGEPAGES", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )
