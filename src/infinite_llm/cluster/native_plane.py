"""The data plane's per-layer exchange in C (``csrc/data_plane.c``): a whole-step native decode's
remote shards on the shared-memory channels, with no Python on either side per layer.

Once a step, per creditor, the debtor sends a ``NativeSetup`` on the channel as a Python message
(the creditor's block lists and slots for the debtor's rows, and how many rows and heads) and
waits for the answer; the setup sizes both of the channel's regions for the layer messages, so
neither moves while C uses it. Then the decoder's attention hook (``remote_step``) writes each
creditor's query rows and new K,V into the region and rings the doorbell after the local
stores, and reads and merges the ``(out, lse)`` after the local MA; the creditor's channel
server hands each doorbell to ``serve_native``, which stores, runs the MA with the very call
the Python path would make (``cpu_native.prepare_decode_call``: same kernel, same split, same
bits) and answers.

Channels across nodes (ZeroMQ) keep the Python hook (``remote_decode``); so does a step whose
creditor declines the setup (its MAs run on another kernel, or its pool is not float32).
Failures end the step as on the Python path (``PeerUnreachable``): a dead creditor's doorbell
reads end of file at once; a silent one is asked ``is_alive`` after each poll slice, and every
wait is bounded by the channel client's timeout. The step's channels are then closed (their
state is mid-message) and reopen at the next need.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from infinite_llm.attention import cpu_native
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan
from infinite_llm.cluster.channel import ShmEnd
from infinite_llm.native.build import NativeLibrary, load_once
from infinite_llm.native.structs import c_struct

if TYPE_CHECKING:
    from infinite_llm.cluster.ray_transport import RayTransport

_SOURCE = Path(__file__).parent / "csrc" / "data_plane.c"
_state: dict[str, NativeLibrary | None] = {}
STRUCTS: dict[str, type[ctypes.Structure]] = {}

SERVE_HANDLED, SERVE_NOTHING, SERVE_CLOSED = -3, -2, -1
AliveFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64)
# remote_step's failures (``RemoteStep.status``), as data_plane.c names them
FAILURES = {
    -101: "its channel closed",
    -102: "no reply in time",
    -103: "the process is gone",
    -104: "a reply out of step",
    -105: "its MA failed",
}


def library() -> NativeLibrary | None:
    """The data plane's C library, built on first use; None where it cannot be had (logged)."""
    return load_once(_state, _SOURCE, _declare)


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("RemoteLink", "RemoteStep", "ServeLink"):
        STRUCTS[name] = c_struct(lib, name)
    lib.serve_native.argtypes = [ctypes.c_void_p]
    lib.serve_native.restype = ctypes.c_int64
    lib.native_sizes.argtypes = [ctypes.c_int64] * 5 + [ctypes.POINTER(ctypes.c_int64)]
    lib.native_sizes.restype = None


def sizes(n_rows: int, n_write: int, hq: int, hkv: int, d: int) -> tuple[int, int]:
    """Bytes of one layer's request and reply (``native_sizes``: C's own layout)."""
    lib = library()
    assert lib is not None
    out = (ctypes.c_int64 * 2)()
    lib.lib.native_sizes(n_rows, n_write, hq, hkv, d, out)
    return out[0], out[1]


def _address(fn: object) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


@dataclass(frozen=True)
class NativeSetup:
    """A debtor's step on one creditor (the first message of each step on the channel):
    ``batch``: the MA's (query_lens, block_ids, context_lens) over the creditor's pool, None
    when it only stores; the slots of the rows it stores come as the message's tensor."""

    step: int
    batch: tuple[list[int], list[list[int]], list[int]] | None
    n_rows: int
    n_write: int
    hq: int
    hkv: int
    d: int


# -- the creditor's side ----------------------------------------------------------------------
class ServedStep:
    """One debtor's step as the creditor's channel server serves it: ``serve()`` answers the
    doorbell waiting on the channel (``SERVE_*``, or a Python message's generation)."""

    def __init__(self, link: ctypes.Structure, keep: tuple, serve: Callable[[int], int]) -> None:
        self._link, self._keep, self._serve = link, keep, serve
        self._address = ctypes.addressof(link)

    def serve(self) -> int:
        return self._serve(self._address)

    def served_s(self) -> list[float]:
        """Seconds each layer served so far took (from doorbell to reply)."""
        times = self._keep[-1]
        return [(end - begin) / 1e9 for begin, end in times.tolist() if end]


def accept(
    setup: NativeSetup,
    slots: torch.Tensor | None,
    end: ShmEnd,
    pool: KVPool,
    impl: str,
    delay_s: float = 0.0,
) -> ServedStep | None:
    """The creditor's answer to a setup on channel ``end``: its step, ready to serve; None (the
    debtor falls back to Python) where this pool's MAs would not run the native kernel."""
    native, lib = cpu_native.native_library(), library()
    if (
        native is None
        or lib is None
        or impl not in ("auto", "native")
        or pool.dtype != torch.float32
        or pool.k.device.type != "cpu"
    ):
        return None
    slot_copy = torch.zeros(0, dtype=torch.int64) if slots is None else slots.clone()
    times = torch.zeros(pool.num_layers, 2, dtype=torch.int64)
    call, prepared = None, None
    if setup.batch is not None:
        batch = MABatch(*setup.batch, pool.block_size)
        q_like = torch.empty(setup.n_rows, setup.hq, setup.d)
        prepared = cpu_native.prepare_decode_call(
            q_like, pool.k[0], pool.v[0], batch, setup.d**-0.5
        )
        if prepared is None:
            return None
        call = prepared.call
        call.write_slots = slot_copy.data_ptr()
    _, reply_bytes = sizes(setup.n_rows, setup.n_write, setup.hq, setup.hkv, setup.d)
    end.reserve(reply_bytes)
    out_region, in_region = end.addresses()
    link = STRUCTS["ServeLink"](
        in_region=in_region,
        out_region=out_region,
        bell_in=end.fd,
        bell_out=end.bell_out(),
        step=setup.step,
        call=0 if call is None else ctypes.addressof(call),
        ma=0 if call is None else _address(native.lib.ma_decode_call),
        store=_address(native.lib.kv_write),
        k_base=pool.k.data_ptr(),
        v_base=pool.v.data_ptr(),
        layer_stride=pool.k.stride(0) * pool.k.element_size(),
        head_stride=pool.k.stride(1),
        num_layers=pool.num_layers,
        n_rows=setup.n_rows,
        n_write=setup.n_write,
        write_slots=slot_copy.data_ptr(),
        hq=setup.hq,
        hkv=setup.hkv,
        d=setup.d,
        delay_ns=int(delay_s * 1e9),
        times=times.data_ptr(),
    )
    return ServedStep(link, (prepared, slot_copy, pool, times), lib.lib.serve_native)


# -- the debtor's side ------------------------------------------------------------------------
class NativeRemoteHook:
    """A step's remote shards through ``remote_step`` (``attention.step_attention.RemoteDecode``).

    Built by ``set_up`` once the step's setups were answered; ``finished``
    records what the exchange cost per layer (``times``), as ``RayTransport.collect`` does for
    the Python path; ``error`` reads the C context's failure and closes the step's channels."""

    def __init__(
        self,
        transport: RayTransport,
        step: int,
        links: list[tuple[int, ShmEnd, torch.Tensor | None, int, torch.Tensor | None, int]],
        t: int,
        heads: tuple[int, int, int],
        num_layers: int,
    ) -> None:
        lib, native = library(), cpu_native.native_library()
        assert lib is not None and native is not None
        self._transport = transport
        self._insts = [inst for inst, *_ in links]
        self._links = links
        hq, hkv, d = heads
        self._bytes = (
            sum(
                n_rows * hq * d * 4 + 2 * n_write * hkv * d * 4 for *_, n_rows, _, n_write in links
            ),
            sum(n_rows * (hq * d + hq) * 4 for *_, n_rows, _, _ in links),
        )
        self._error: BaseException | None = None
        self._times = torch.zeros(num_layers, 2 + 4 * len(links), dtype=torch.int64)
        self._array = (STRUCTS["RemoteLink"] * len(links))()
        for slot, (_, end, rows, n_rows, write_rows, n_write) in zip(self._array, links):
            out_region, in_region = end.addresses()
            slot.out_region, slot.in_region = out_region, in_region
            slot.bell_out, slot.bell_in = end.bell_out(), end.fd
            slot.rows = 0 if rows is None else rows.data_ptr()
            slot.n_rows = n_rows
            slot.write_rows = 0 if write_rows is None else write_rows.data_ptr()
            slot.n_write = n_write
        channels = transport.channels
        self._alive = AliveFn(lambda c: int(transport.peer_alive(self._insts[c])))
        self._step = STRUCTS["RemoteStep"](
            num_links=len(links),
            links=ctypes.addressof(self._array),
            t=t,
            hq=hq,
            hkv=hkv,
            d=d,
            step=step,
            merge=_address(native.lib.merge_into),
            alive=_address(self._alive),
            slice_ms=max(1, int(channels.slice_s * 1000)),
            timeout_ms=max(1, int(channels.timeout_s * 1000)),
            failed=-1,
            status=0,
            pending=0,
            times=self._times.data_ptr(),
            num_layers=num_layers,
        )
        self.address = _address(lib.lib.remote_step)
        self.context = ctypes.addressof(self._step)

    @property
    def error(self) -> BaseException | None:
        """Why the exchange stopped the step (None: it did not). A step the decoder stopped
        for its own reason between a layer's sends and its merge leaves replies on the
        channels: they are closed (reopened at the next need) so no later wait reads them."""
        if self._error is None and not self._step.status and self._step.pending:
            for inst in self._insts:
                self._transport.channels.forget(inst)
            self._step.pending = 0
        if self._error is None and self._step.status:
            from infinite_llm.cluster.ray_transport import PeerUnreachable

            failed = self._insts[self._step.failed] if self._step.failed >= 0 else None
            reason = FAILURES.get(self._step.status, f"status {self._step.status}")
            for inst in self._insts:  # mid-message: closed, reopened at the next need
                self._transport.channels.forget(inst)
            self._transport.note_unreachable([] if failed is None else [failed])
            self._error = PeerUnreachable([] if failed is None else [failed])
            self._error.add_note(f"instance {failed}: {reason}")
        return self._error

    def finished(self) -> None:
        """Per layer, on the node's one clock: the round trip (first send to last reply read),
        the wait after the local MA, and the wire (the slowest creditor's send-to-start plus
        end-to-read beyond the local MA), as ``RayTransport.collect`` records them."""
        times = self._times[self._times[:, 0] != 0]  # the layers that ran
        start, local_done = times[:, 0], times[:, 1]
        sent, got, began, ended = times[:, 2:].view(len(times), len(self._links), 4).unbind(-1)
        last = got.amax(1)
        beyond = (got - torch.maximum(ended, local_done[:, None])).clamp(min=0)
        wire = (began - sent + beyond).amax(1)
        self._transport.record_layers(
            *((x.double() / 1e9).tolist() for x in (last - start, last - local_done, wire))
        )
        layers = len(times)
        self._transport.count_exchange(
            layers * len(self._links), *(layers * b for b in self._bytes)
        )


_steps = itertools.count(1)  # every set-up step's number, unique in this process


def set_up(
    transport: RayTransport,
    plan: DistPlan,
    insts: tuple[int, ...],
    heads: tuple[int, int, int],
    num_layers: int,
) -> NativeRemoteHook | None:
    """Set a step up on every creditor's channel for ``remote_step``: None (nothing sent) where
    a channel is not shared memory; None too where a creditor declines (nothing to undo: a
    setup only prepares). Raises what the channels raise when a creditor cannot be reached."""
    links = plan_links(plan, insts)
    channels = transport.channels
    ends = {inst: channels.end(inst) for inst in insts}
    if any(not isinstance(end, ShmEnd) for end in ends.values()):
        return None
    step = next(_steps)
    slot_bytes = 0
    for inst, _, n_rows, _, slots, n_write in links:
        shard = plan.shards.get(inst)
        batch = None
        if shard is not None and shard.batch is not None:
            b = shard.batch
            batch = (b.query_lens, b.block_ids, b.context_lens)
        request_bytes, _ = sizes(n_rows, n_write, *heads)
        ends[inst].reserve(request_bytes)
        channels.send(inst, NativeSetup(step, batch, n_rows, n_write, *heads), [slots])
        transport.forget_sent_batch(inst)
        slot_bytes += 0 if slots is None else slots.nbytes
    replies = channels.wait(insts)
    transport.count_exchange(0, slot_bytes, 0)
    if not all(header for header, _ in replies.values()):
        return None
    return NativeRemoteHook(
        transport,
        step,
        [(inst, ends[inst], rows, n, write_rows, w) for inst, rows, n, write_rows, _, w in links],
        plan.num_tokens,
        heads,
        num_layers,
    )


def plan_links(
    plan: DistPlan, insts: tuple[int, ...]
) -> list[tuple[int, torch.Tensor | None, int, torch.Tensor | None, torch.Tensor | None, int]]:
    """Per creditor: (instance, its query rows or None for all, how many, the rows it stores
    or None for all, their slots, how many)."""
    t = plan.num_tokens
    out = []
    for inst in insts:
        shard, write = plan.shards.get(inst), plan.writes.get(inst)
        rows = None if shard is None else _rows(shard.rows)
        n_rows = 0 if shard is None else (t if rows is None else len(rows))
        write_rows = None if write is None else _rows(write.rows)
        n_write = 0 if write is None else (t if write_rows is None else len(write_rows))
        slots = None if write is None else write.slots.to(torch.int64).contiguous()
        out.append((inst, rows, n_rows, write_rows, slots, n_write))
    return out


def _rows(rows: object) -> torch.Tensor | None:
    if rows is None:
        return None
    return torch.as_tensor(rows, dtype=torch.int64).contiguous()
