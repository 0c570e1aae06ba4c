"""Who talks on the data plane's channels (``cluster.channel``): a creditor's ``ChannelServer``
thread, which answers every debtor's messages, and a debtor's ``ChannelClient``, which opens a
channel per creditor on first need, sends, and waits for the replies under a deadline.

Each request carries a sequence number that its reply echoes; a handler that fails is answered
with a ``ChannelError`` (so the debtor raises instead of waiting); a creditor that dies or stays
silent past the deadline fails the wait with ``ChannelFailed``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from infinite_llm.cluster.channel import (
    ChannelClosed,
    ChannelEnd,
    ChannelSpec,
    ShmEnd,
    Tensors,
    attach,
    creditor_end,
    poll_target,
    zmq_frames,
    zmq_message,
)
from infinite_llm.cluster.native_plane import (
    SERVE_CLOSED,
    SERVE_HANDLED,
    SERVE_NOTHING,
    ServedStep,
)

logger = logging.getLogger(__name__)

Handler = Callable[[int, Any, list[torch.Tensor | None]], tuple[Any, Tensors]]


class ChannelServer:
    """A creditor's serving thread: answers every debtor's messages with ``handler(debtor_id,
    header, tensors) -> (header, tensors)``, one at a time, while the instance's own step runs
    on another thread (so mutual borrowing cannot deadlock: a step waits on peers, the server
    waits on nothing but its channels).

    ``open(debtor_id, same_node)`` makes a channel for a debtor and returns its spec; it may be
    called from any thread. The ROUTER socket for debtors on other nodes is bound at start;
    ``on_start`` runs first on the server's thread (its OpenMP threads, say).
    """

    def __init__(
        self,
        instance_id: int,
        handler: Handler,
        directory: str,
        host: str = "127.0.0.1",
        on_start: Callable[[], object] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self._on_start = on_start
        self._handler = handler
        self._dir = directory
        self._context = zmq.Context.instance()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._wake_r, self._wake_w = os.pipe()
        self._openings = itertools.count()
        self._lock = threading.Lock()
        self._new: list[tuple[int, ShmEnd]] = []
        self._ends: dict[int, ShmEnd] = {}  # by fd
        self._debtors: dict[int, int] = {}  # fd -> debtor id
        self._native: dict[int, ServedStep] = {}  # fd -> the step C serves on it
        self._serving: int | None = None  # the shm channel whose message the handler answers
        self._closed = False
        self.num_served = 0
        self._thread = threading.Thread(target=self._loop, name="channel-server", daemon=True)
        self._thread.start()

    def open(self, debtor_id: int, same_node: bool) -> ChannelSpec:
        if not same_node:
            return ChannelSpec("zmq", self.instance_id, self.address)
        # unique per opening: a debtor that reopens must not meet the old channel's files,
        # which the server removes when it sees that channel close
        prefix = os.path.join(
            self._dir, f"{debtor_id}-{self.instance_id}-{os.getpid()}-{next(self._openings)}"
        )
        end = creditor_end(prefix)
        with self._lock:  # the wake-up pipe is open exactly while not closed
            if self._closed:
                end.close(unlink=True)
                raise ChannelClosed(f"instance {self.instance_id}'s channel server is closed")
            self._new.append((debtor_id, end))
            os.write(self._wake_w, b"n")
        return ChannelSpec("shm", self.instance_id, prefix)

    def end_in_service(self) -> ShmEnd | None:
        """For the handler, on the server's thread: the shared-memory channel whose message it
        is answering (None: a ZeroMQ one)."""
        return None if self._serving is None else self._ends[self._serving]

    def serve_natively(self, step: ServedStep) -> ServedStep | None:
        """For the handler: from now on C serves the native messages on the channel in service
        (``native_plane``), the Python ones still come to the handler; returns the step C
        served there before."""
        assert self._serving is not None
        previous = self._native.get(self._serving)
        self._native[self._serving] = step
        return previous

    def close(self) -> None:
        with self._lock:
            if self._closed:  # closed before, or the loop ended (and closed the pipe) itself
                return
            self._closed = True
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        try:
            while not self._closed:
                for target, _ in poller.poll():
                    if target == self._wake_r:
                        os.read(self._wake_r, 64)
                        with self._lock:
                            new, self._new = self._new, []
                        for debtor_id, end in new:
                            self._ends[end.fd] = end
                            self._debtors[end.fd] = debtor_id
                            poller.register(end.fd, zmq.POLLIN)
                    elif target is self._router:
                        self._serve_router()
                    else:
                        self._serve_shm(poller, target)
        except Exception:  # the server cannot go on: its debtors see their channels close
            logger.exception("channel server of instance %d stopped", self.instance_id)
        finally:
            with self._lock:
                self._closed = True
                for end in self._ends.values():
                    end.close(unlink=True)
                for _, end in self._new:
                    end.close(unlink=True)
                self._router.close(linger=0)
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _serve_shm(self, poller: zmq.Poller, fd: int) -> None:
        end = self._ends[fd]
        try:
            native = self._native.get(fd)
            if native is None:
                message = end.recv()
            else:
                code = native.serve()
                if code == SERVE_HANDLED:
                    self.num_served += 1
                    return
                if code == SERVE_CLOSED:
                    raise ChannelClosed("the other end closed its doorbell")
                message = None if code == SERVE_NOTHING else end.read(code)
            if message is None:
                return
            self._serving = fd
            try:
                reply = self._answer(self._debtors[fd], *message)
            finally:
                self._serving = None
            end.send(*reply)
        except Exception as exc:  # the debtor is gone, or its message unreadable: so is this
            # channel (its debtor sees end of file and opens a new one at its next need)
            if not isinstance(exc, ChannelClosed):
                logger.exception("channel from %d closed on a bad message", self._debtors[fd])
            poller.unregister(fd)
            del self._ends[fd], self._debtors[fd]
            self._native.pop(fd, None)
            end.close(unlink=True)

    def _serve_router(self) -> None:
        try:
            frames = self._router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        identity = frames[0]
        try:
            header, tensors = zmq_message(frames[1:])
        except Exception:  # unreadable: dropped (its debtor's wait ends at its deadline)
            logger.exception("dropped an unreadable message from %r", identity)
            return
        reply = self._answer(int(identity), header, tensors)
        self._router.send_multipart([identity, *zmq_frames(*reply)], copy=False)

    def _answer(self, debtor_id: int, header: Any, tensors: list[Any]) -> tuple[Any, Tensors]:
        seq, body = header
        self.num_served += 1
        try:
            reply, out = self._handler(debtor_id, body, tensors)
        except Exception as exc:  # answered, so the debtor raises instead of waiting
            logger.exception("channel handler failed on a message from %d", debtor_id)
            return (seq, ChannelError(f"{type(exc).__name__}: {exc}")), []
        return (seq, reply), out


@dataclass(frozen=True)
class ChannelError:
    """A reply header saying the handler failed on the other side."""

    message: str


class ChannelFailed(RuntimeError):
    """Creditors that could not answer: gone, unreachable past the deadline, or failing."""

    def __init__(self, creditor_ids: list[int], reason: str) -> None:
        super().__init__(f"instances {creditor_ids}: {reason}")
        self.creditor_ids = creditor_ids


class ChannelClient:
    """A debtor's channels, one per creditor, opened on first need through ``opener(creditor_id)
    -> ChannelSpec`` (an actor call to the creditor, once per pair) and kept after.

    ``send`` one request per creditor, then ``wait`` for their replies: the poll runs in slices
    of ``slice_s``; after a silent slice ``is_alive(creditor_id)`` is asked of every creditor
    still owing a reply, and one found dead (or any silence past ``timeout_s``) fails the wait
    with ``ChannelFailed``. A creditor whose reply is abandoned that way still owes it: its
    channel drains it before the next request, so replies never cross.
    """

    def __init__(
        self,
        debtor_id: int,
        opener: Callable[[int], ChannelSpec],
        is_alive: Callable[[int], bool],
        timeout_s: float = 300.0,
        slice_s: float = 1.0,
    ) -> None:
        self.debtor_id = debtor_id
        self._opener = opener
        self._is_alive = is_alive
        self.timeout_s = timeout_s
        self.slice_s = slice_s
        self._context = zmq.Context.instance()
        self._ends: dict[int, ChannelEnd] = {}
        self._owed: dict[int, int] = {}  # creditor -> seq of the request it has not answered
        self._seq = 0
        self.arrivals: dict[int, float] = {}  # creditor -> time.monotonic() its last reply was read

    @property
    def creditor_ids(self) -> list[int]:
        return sorted(self._ends)

    def kind(self, creditor_id: int) -> str | None:
        end = self._ends.get(creditor_id)
        return None if end is None else end.kind

    def end(self, creditor_id: int) -> ChannelEnd:
        """The channel to a creditor, opened now if it is not yet."""
        end = self._ends.get(creditor_id)
        if end is None:
            end = self._ends[creditor_id] = attach(
                self._opener(creditor_id), self.debtor_id, self._context
            )
        return end

    def send(self, creditor_id: int, header: Any, tensors: Tensors) -> None:
        end = self.end(creditor_id)
        if creditor_id in self._owed:  # an abandoned request's reply comes first
            self.wait([creditor_id])
        self._seq += 1
        try:
            end.send((self._seq, header), tensors)
        except ChannelClosed as exc:
            self.forget(creditor_id)
            raise ChannelFailed([creditor_id], "its channel is closed") from exc
        self._owed[creditor_id] = self._seq

    def wait(self, creditor_ids: Sequence[int]) -> dict[int, tuple[Any, list[torch.Tensor | None]]]:
        """Every listed creditor's reply to its last request (tensors: views of channel memory,
        valid until the next ``send`` to that creditor)."""
        replies: dict[int, tuple[Any, list[torch.Tensor | None]]] = {}
        owed = {c for c in creditor_ids if c in self._owed}
        poller = zmq.Poller()
        targets = {}
        for c in owed:
            target = poll_target(self._ends[c])
            targets[target if isinstance(target, int) else id(target)] = c
            poller.register(target, zmq.POLLIN)
        start = time.monotonic()
        while owed:
            ready = poller.poll(int(self.slice_s * 1000))
            if not ready:
                dead = sorted(c for c in owed if not self._is_alive(c))
                if dead:
                    for c in dead:
                        self.forget(c)
                    raise ChannelFailed(dead, "the process is gone")
                if time.monotonic() - start > self.timeout_s:
                    raise ChannelFailed(sorted(owed), f"no reply within {self.timeout_s:.0f} s")
                continue
            for target, _ in ready:
                c = targets[target if isinstance(target, int) else id(target)]
                try:
                    message = self._ends[c].recv()
                except ChannelClosed as exc:
                    self.forget(c)
                    raise ChannelFailed([c], "its channel closed") from exc
                if message is None:
                    continue
                (seq, header), tensors = message
                if seq != self._owed.get(c):
                    continue  # a reply to an abandoned request (cannot happen with one in flight)
                del self._owed[c]
                owed.discard(c)
                self.arrivals[c] = time.monotonic()
                poller.unregister(target if isinstance(target, int) else self._ends[c].socket)
                if isinstance(header, ChannelError):
                    raise ChannelFailed([c], header.message)
                replies[c] = (header, tensors)
        return replies

    def forget(self, creditor_id: int) -> None:
        """Close the channel to a creditor that died (or that this debtor no longer reaches)."""
        end = self._ends.pop(creditor_id, None)
        self._owed.pop(creditor_id, None)
        if end is not None:
            end.close(unlink=False)

    def close(self) -> None:
        for c in list(self._ends):
            self.forget(c)
