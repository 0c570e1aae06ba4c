"""The data plane between instance actors: persistent channels for the per-layer shard traffic.

Per layer a debtor sends each creditor one message (queries, the new tokens' K,V and their
slots; the MA's block lists on a step's first layer) and waits for one reply, ``(out, lse)``.
A Ray task call costs about a millisecond here, so this traffic runs on a channel set up once
per (debtor, creditor) pair, on the debtor's first need, and reused every layer after:

* **same Ray node** (``shm``): the message in a shared-memory file, a 4-byte doorbell through a
  named FIFO each way. A round trip costs two wake-ups, the floor for reaching another process;
  ZeroMQ's I/O threads make it six (``infinite-llm bench channels`` measures both).
* **different nodes** (``zmq``): a ZeroMQ DEALER on the debtor, the creditor's ROUTER, over tcp.

A message is a header (any picklable object) plus tensors; the reader gets the tensors as views
of the channel's memory, valid until it sends its next message on that channel. At most one
request is in flight per channel: the debtor waits for (or drains) a reply before it sends the
next request, so neither side ever rewrites memory the other is reading.

Failures: a peer process that dies closes its FIFO ends, which the other side's poll sees at
once (``ChannelClosed``); a ZeroMQ peer is found by the caller's timeout and liveness check.
Shared-memory files and FIFOs live in one directory per cluster and node (``channel_dir``),
removed by the side that made them and, for whatever a killed process left, by the driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

_BELL = struct.Struct("<I")  # a doorbell: the generation of the region that holds the message
NATIVE_BELL = 0xFFFFFFFF  # a doorbell for a message laid out by C (``csrc/data_plane.h``)
_LEN = struct.Struct("<Q")
_ALIGN = 64
_MIN_REGION = 1 << 16
_DTYPES = {
    str(t): t
    for t in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8)
}

Tensors = Sequence[torch.Tensor | None]


class ChannelClosed(ConnectionError):
    """The other end of a channel is gone (its process died or closed it)."""


def channel_dir(cluster_token: str) -> str:
    """This node's directory for the channels of one cluster (shared memory where Linux has it)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, f"infinite-llm-{cluster_token}")
    os.makedirs(path, exist_ok=True)
    return path


def remove_channel_dir(cluster_token: str) -> None:
    """Remove what a cluster's channels left on this node (after its actors are gone)."""
    for base in ("/dev/shm", tempfile.gettempdir()):
        shutil.rmtree(os.path.join(base, f"infinite-llm-{cluster_token}"), ignore_errors=True)


# -- message layout ---------------------------------------------------------------------------
def _describe(header: Any, tensors: Tensors) -> tuple[bytes, list[torch.Tensor | None]]:
    flat = [None if t is None else t.detach().contiguous() for t in tensors]
    meta = [None if t is None else (str(t.dtype), tuple(t.shape)) for t in flat]
    return pickle.dumps((header, meta), protocol=5), flat


def _offsets(meta_len: int, sizes: list[int]) -> tuple[list[int], int]:
    at = -(-(_LEN.size + meta_len) // _ALIGN) * _ALIGN
    offsets = []
    for n in sizes:
        offsets.append(at)
        at += -(-n // _ALIGN) * _ALIGN
    return offsets, at


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _tensor(buffer: Any, spec: tuple[str, tuple[int, ...]] | None, offset: int = 0) -> Any:
    if spec is None:
        return None
    dtype, shape = _DTYPES[spec[0]], spec[1]
    count = 1
    for n in shape:
        count *= n
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


class _Region:
    """One direction of a shm channel: a shared-memory file written by one side and read by the
    other. A message larger than the file goes into a new, bigger file (the next generation,
    named in the doorbell); the writer removes the old one's name, readers drop their mapping."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = -1
        self._map: mmap.mmap | None = None
        self._pinned: ctypes.c_char | None = None  # the mapping's start, for C (``address``)

    def _file(self, generation: int) -> str:
        return f"{self.path}.{generation}"

    def reserve(self, size: int) -> None:
        """At least ``size`` bytes from now on (a message that grows it later moves it)."""
        if self._map is None or size > len(self._map):
            self._grow(size)

    def address(self) -> int:
        """Where this side maps the region now (valid until it moves: see ``reserve``)."""
        if self._map is None:
            raise ChannelClosed(f"{self.path}: nothing mapped")
        if self._pinned is None:
            self._pinned = ctypes.c_char.from_buffer(self._map)
        return ctypes.addressof(self._pinned)

    def write(self, header: Any, tensors: Tensors) -> int:
        meta, flat = _describe(header, tensors)
        offsets, size = _offsets(len(meta), [_nbytes(t) for t in flat])
        self.reserve(size)
        buf = self._map
        assert buf is not None
        _LEN.pack_into(buf, 0, len(meta))
        buf[_LEN.size : _LEN.size + len(meta)] = meta
        for t, at in zip(flat, offsets):
            if t is not None and t.numel():
                buf[at : at + _nbytes(t)] = _as_bytes(t)
        return self.generation

    def _grow(self, size: int) -> None:
        size = max(_MIN_REGION, 1 << (size - 1).bit_length())
        old = self.generation
        self.generation += 1
        fd = os.open(self._file(self.generation), os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            new = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._release()
        self._map = new
        if old >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(old))

    def read(self, generation: int) -> tuple[Any, list[torch.Tensor | None]]:
        if generation != self.generation or self._map is None:
            fd = os.open(self._file(generation), os.O_RDWR)
            try:
                new = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self._release()
            self._map, self.generation = new, generation
        buf = self._map
        (meta_len,) = _LEN.unpack_from(buf, 0)
        header, meta = pickle.loads(buf[_LEN.size : _LEN.size + meta_len])
        sizes = [0 if m is None else _DTYPES[m[0]].itemsize * _count(m[1]) for m in meta]
        offsets, _ = _offsets(meta_len, sizes)
        return header, [_tensor(buf, m, at) for m, at in zip(meta, offsets)]

    def _release(self) -> None:
        self._pinned = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still in use keeps it mapped
                self._map.close()
            self._map = None

    def close(self, unlink: bool) -> None:
        self._release()
        if unlink and self.generation >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(self.generation))


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- the two kinds of channel -----------------------------------------------------------------
@dataclass(frozen=True)
class ChannelSpec:
    """How a debtor reaches a creditor's channel: ``shm`` (``address``: the channel's path
    prefix on this node) or ``zmq`` (``address``: the creditor's ROUTER endpoint)."""

    kind: str
    creditor_id: int
    address: str


class ShmEnd:
    """One side of the shm channel at ``prefix``: the creditor reads requests from
    ``prefix.in`` (doorbell ``prefix.req``) and writes replies to ``prefix.out`` (doorbell
    ``prefix.rep``); the debtor the other way round. Doorbells are FIFOs opened non-blocking:
    a dead writer reads as end of file, a dead reader fails the write."""

    kind = "shm"

    def __init__(self, prefix: str, creditor: bool) -> None:
        self.prefix = prefix
        self.creditor = creditor
        inbox, outbox = (".in", ".out") if creditor else (".out", ".in")
        bell_in, self._bell_out_path = (
            (prefix + ".req", prefix + ".rep") if creditor else (prefix + ".rep", prefix + ".req")
        )
        self._in, self._out = _Region(prefix + inbox), _Region(prefix + outbox)
        self.fd = os.open(bell_in, os.O_RDONLY | os.O_NONBLOCK)
        # The debtor opens its request doorbell now (the creditor's read end exists); the
        # creditor opens its reply doorbell at its first reply (the debtor's read end exists).
        self._bell_out = (
            None if creditor else os.open(self._bell_out_path, os.O_WRONLY | os.O_NONBLOCK)
        )

    def bell_out(self) -> int:
        """The outgoing doorbell's fd (the creditor opens it at its first need: by then the
        debtor, which opened its read end first thing, is listening)."""
        try:
            if self._bell_out is None:
                self._bell_out = os.open(self._bell_out_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: nobody reads the other end any more
            raise ChannelClosed(str(exc)) from exc
        return self._bell_out

    def send(self, header: Any, tensors: Tensors) -> None:
        generation = self._out.write(header, tensors)
        try:
            os.write(self.bell_out(), _BELL.pack(generation))
        except OSError as exc:  # EPIPE: nobody reads the other end any more
            raise ChannelClosed(str(exc)) from exc

    def reserve(self, size: int) -> None:
        """Room for an outgoing message of ``size`` bytes laid out by C, before a Python message
        (which then goes into the same region) tells the other side where it is."""
        self._out.reserve(size)

    def addresses(self) -> tuple[int, int]:
        """(this side's mapping of its own region, of the other side's), for C."""
        return self._out.address(), self._in.address()

    def recv(self) -> tuple[Any, list[torch.Tensor | None]] | None:
        """The message waiting (None if the doorbell was not rung after all)."""
        try:
            data = os.read(self.fd, _BELL.size)
        except BlockingIOError:
            return None
        if not data:
            raise ChannelClosed("the other end closed its doorbell")
        (generation,) = _BELL.unpack(data)
        return self.read(generation)

    def read(self, generation: int) -> tuple[Any, list[torch.Tensor | None]]:
        """The Python message whose doorbell (``generation``) was read already."""
        if generation == NATIVE_BELL:  # C's message, and C is not listening: out of step
            raise ChannelClosed("a native message on a channel C does not serve")
        return self._in.read(generation)

    def close(self, unlink: bool) -> None:
        for fd in (self.fd, self._bell_out):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._out.close(unlink=True)  # each side removes what it wrote
        self._in.close(unlink=False)
        if unlink:
            for suffix in (".req", ".rep"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.prefix + suffix)


def creditor_end(prefix: str) -> ShmEnd:
    for suffix in (".req", ".rep"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prefix + suffix)
        os.mkfifo(prefix + suffix, 0o600)
    return ShmEnd(prefix, creditor=True)


def zmq_frames(header: Any, tensors: Tensors) -> list[Any]:
    meta, flat = _describe(header, tensors)
    return [meta, *(b"" if t is None else _as_bytes(t) for t in flat)]


def zmq_message(frames: list[Any]) -> tuple[Any, list[torch.Tensor | None]]:
    header, meta = pickle.loads(frames[0])
    # A received frame is read-only memory: copy into tensors the reader may keep or write.
    return header, [
        _tensor(bytearray(f), m) if m is not None else None for f, m in zip(frames[1:], meta)
    ]


class ZmqEnd:
    """The debtor's end of a zmq channel: a DEALER connected to the creditor's ROUTER."""

    kind = "zmq"

    def __init__(self, context: zmq.Context, address: str, identity: bytes) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, header: Any, tensors: Tensors) -> None:
        self.socket.send_multipart(zmq_frames(header, tensors), copy=False)

    def recv(self) -> tuple[Any, list[torch.Tensor | None]] | None:
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return zmq_message(frames)

    def close(self, unlink: bool) -> None:
        self.socket.close(linger=0)


ChannelEnd = ShmEnd | ZmqEnd


def attach(spec: ChannelSpec, debtor_id: int, context: zmq.Context) -> ChannelEnd:
    """The debtor's end of the channel ``spec`` describes."""
    if spec.kind == "shm":
        return ShmEnd(spec.address, creditor=False)
    return ZmqEnd(context, spec.address, str(debtor_id).encode())


def poll_target(end: ChannelEnd) -> Any:
    """What a ``zmq.Poller`` waits on for this end's incoming messages."""
    return end.socket if isinstance(end, ZmqEnd) else end.fd
