"""``RemoteDecodeHook``: the creditors' shards of a fused native decode step on a Ray actor.

The native decoder (``model/csrc/decoder.c``) runs a whole decode step in one C call. Rows
whose context also lives in other actors' pools join it through this hook, called twice a
layer from inside that call: after the local K,V stores it sends each creditor its rows'
queries and new K,V (taken from the step's ``qkv`` buffer) on the data plane's channel; after
the local MA it merges each creditor's ``(out, lse)`` into the step's attention state, in the
order the messages went out, as ``DistAttention`` merges them on the layer-by-layer path (the
same kernels, so the same bits). Between two layers only C runs: the layer-by-layer torch path
spent about a third of a SmolLM2 decode step outside the linears.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from infinite_llm.attention.dist import ShardWork
from infinite_llm.attention.merge import merge_into
from infinite_llm.attention.plan import DistPlan, take_rows

if TYPE_CHECKING:
    from infinite_llm.cluster.ray_transport import Exchange, RayTransport

RemoteFn = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
)
FAILED = -100  # the status the native decoder stops on; ``error`` says why


def _floats(address: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return torch.frombuffer((ctypes.c_float * n).from_address(address), dtype=torch.float32).view(
        shape
    )


class RemoteDecodeHook:
    """One step's remote shards (``attention.step_attention.RemoteDecode``): ``address`` is the C
    callback; ``error`` the exception that ended the step, if one did."""

    def __init__(
        self,
        transport: RayTransport,
        plan: DistPlan,
        insts: tuple[int, ...],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        self._transport = transport
        self._shards = [(i, plan.shards[i], plan.writes.get(i)) for i in insts]
        self._t = plan.num_tokens
        self._heads = (num_heads, num_kv_heads, head_dim)
        self._views: tuple[int, int, int, tuple[torch.Tensor, ...]] | None = None
        self._exchange: Exchange | None = None
        self.error: BaseException | None = None
        self._fn = RemoteFn(self._call)  # kept alive as long as the hook
        self.address: int = ctypes.cast(self._fn, ctypes.c_void_p).value or 0
        self.context = 0

    def finished(self) -> None:
        pass  # each layer's exchange recorded itself (``RayTransport.collect``)

    def _call(self, ctx: int | None, phase: int, layer: int, qkv: int, attn: int, lse: int) -> int:
        try:
            views = self._tensors(qkv, attn, lse)
            if phase == 0:
                self._send(layer, views[0], views[1], views[2])
            else:
                self._merge(views[3], views[4])
        except BaseException as exc:  # reported through the decoder, raised there
            self.error = exc
            return FAILED
        return 0

    def _tensors(self, qkv: int, attn: int, lse: int) -> tuple[torch.Tensor, ...]:
        """q, k, v [t, heads, D] (views of qkv), attn [t, Hq, D] and lse [t, Hq] over the
        decoder's scratch buffers (the same addresses every layer of a step)."""
        if self._views is None or self._views[:3] != (qkv, attn, lse):
            t, (hq, hkv, d) = self._t, self._heads
            rows = _floats(qkv, (t, (hq + 2 * hkv) * d))
            q = rows[:, : hq * d].view(t, hq, d)
            k = rows[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
            v = rows[:, (hq + hkv) * d :].view(t, hkv, d)
            out = _floats(attn, (t, hq, d))
            self._views = (qkv, attn, lse, (q, k, v, out, _floats(lse, (t, hq))))
        return self._views[3]

    def _send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        work = {}
        for inst, shard, write in self._shards:
            w = ShardWork(q=take_rows(q, shard.rows), batch=shard.batch)
            if write is not None:
                w.write_slots, w.k, w.v = (
                    write.slots,
                    take_rows(k, write.rows),
                    take_rows(v, write.rows),
                )
            work[inst] = w
        self._exchange = self._transport.send_shards(layer, work)

    def _merge(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        exchange, self._exchange = self._exchange, None
        assert exchange is not None
        rows = {inst: shard.rows for inst, shard, _ in self._shards}
        for inst, (part_out, part_lse) in self._transport.collect(exchange).items():
            merge_into(out, lse, rows[inst], part_out, part_lse)
