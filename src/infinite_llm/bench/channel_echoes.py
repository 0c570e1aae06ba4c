"""The two ends of ``bench channels``' candidates other than Ray's own: echo servers that actor
B runs in a thread (ZeroMQ, named FIFOs, the engine's own data-plane channel) and the clients
actor A times against them. Every wait has a timeout (``TIMEOUT_S``)."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TIMEOUT_S = 30.0  # any single wait: a connection, one round trip, a server starting or stopping
POLL_S = 0.1  # how often an echo thread checks whether it should stop


def make_payload(payload_bytes: int) -> np.ndarray:
    return np.ones(max(1, payload_bytes // 4), dtype=np.float32)


def round_trips(round_trip: Callable[[], object], num_calls: int, warmup: int) -> list[float]:
    """Seconds of each of ``num_calls`` round trips, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        round_trip()
    times = []
    for _ in range(num_calls):
        start = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - start)
    return times


def expect(reply: Any, sent: np.ndarray) -> None:
    if len(reply) != len(sent):
        raise RuntimeError(f"echo returned {len(reply)} elements, sent {len(sent)}")


# -- the echo servers B runs in a thread ----------------------------------------------------


def _zmq_echo(endpoint: str, ready: queue.Queue, stop: threading.Event) -> None:
    """ROUTER echoing every message to its sender; ``endpoint`` "tcp" binds a free port."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(POLL_S * 1000))
    try:
        if endpoint == "tcp":
            endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            sock.bind(endpoint)
        ready.put(endpoint)
        while not stop.is_set():
            try:
                frames = sock.recv_multipart(copy=False)
            except zmq.Again:
                continue
            sock.send_multipart(frames, copy=False)
    except BaseException as e:
        ready.put(e)
    finally:
        sock.close()
        ctx.term()


def _open_writer(path: str, deadline: float) -> int:
    """Write end of a FIFO, once its reader has opened it (non-blocking: no hang)."""
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _read_byte(fd: int, timeout_s: float) -> bytes:
    """One byte, or b"" on timeout or end of file."""
    if not select.select([fd], [], [], timeout_s)[0]:
        return b""
    try:
        return os.read(fd, 1)
    except BlockingIOError:
        return b""


def _pipe_echo(directory: str, ready: queue.Queue, stop: threading.Event) -> None:
    """Echoes every byte from FIFO ``a2b`` to FIFO ``b2a``, both in ``directory``."""
    fds: list[int] = []
    try:
        a2b, b2a = os.path.join(directory, "a2b"), os.path.join(directory, "b2a")
        os.mkfifo(a2b)
        os.mkfifo(b2a)
        fds.append(os.open(a2b, os.O_RDONLY | os.O_NONBLOCK))
        ready.put(directory)
        deadline = time.monotonic() + TIMEOUT_S
        while not stop.is_set():  # A opens its read end when it starts measuring
            try:
                fds.append(_open_writer(b2a, time.monotonic() + POLL_S))
                break
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
        while not stop.is_set() and len(fds) == 2:
            if not select.select([fds[0]], [], [], POLL_S)[0]:
                continue
            byte = os.read(fds[0], 1)
            if not byte:  # A closed its end
                break
            os.write(fds[1], byte)
    except BaseException as e:
        ready.put(e)
    finally:
        for fd in fds:
            os.close(fd)


class EchoThread:
    """One echo server in a thread of B: started with its endpoint known, stopped and cleaned."""

    def __init__(self, kind: str) -> None:
        self.ready: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.directory: str | None = None
        if kind in ("zmq_ipc", "pipe_floor"):
            self.directory = tempfile.mkdtemp(prefix="bench-channels-", dir=tempfile.gettempdir())
        if kind == "zmq_ipc":
            target, arg = _zmq_echo, f"ipc://{self.directory}/echo.sock"
        elif kind == "zmq_tcp":
            target, arg = _zmq_echo, "tcp"
        elif kind == "pipe_floor":
            target, arg = _pipe_echo, self.directory
        else:
            raise ValueError(f"no echo thread for {kind}")
        self.thread = threading.Thread(
            target=target, args=(arg, self.ready, self.stop_event), daemon=True
        )
        self.thread.start()
        try:
            endpoint = self.ready.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"{kind} echo thread did not start in {TIMEOUT_S} s") from None
        if isinstance(endpoint, BaseException):
            self.stop()
            raise endpoint
        self.endpoint: str = endpoint

    def stop(self) -> str | None:
        """Stops the thread and removes its files; the error it hit meanwhile, if any."""
        self.stop_event.set()
        self.thread.join(TIMEOUT_S)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.thread.is_alive():
            return "echo thread did not stop"
        with contextlib.suppress(queue.Empty):
            error = self.ready.get_nowait()
            if isinstance(error, BaseException):
                return f"echo thread: {type(error).__name__}: {error}"
        return None


# -- the clients A runs ---------------------------------------------------------------------


def zmq_client(endpoint: str, payload_bytes: int, num_calls: int, warmup: int) -> list[float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
    payload = make_payload(payload_bytes)
    try:
        sock.connect(endpoint)

        def round_trip() -> None:
            sock.send(payload)
            expect(np.frombuffer(sock.recv(), dtype=np.float32), payload)

        return round_trips(round_trip, num_calls, warmup)
    finally:
        sock.close()
        ctx.term()


def pipe_client(directory: str, num_calls: int, warmup: int) -> list[float]:
    fds: list[int] = []
    try:
        fds.append(os.open(os.path.join(directory, "b2a"), os.O_RDONLY | os.O_NONBLOCK))
        fds.append(_open_writer(os.path.join(directory, "a2b"), time.monotonic() + TIMEOUT_S))
        reader, writer = fds

        def round_trip() -> None:
            os.write(writer, b"x")
            if _read_byte(reader, TIMEOUT_S) != b"x":
                raise TimeoutError(f"no byte back in {TIMEOUT_S} s")

        return round_trips(round_trip, num_calls, warmup)
    finally:
        for fd in fds:
            os.close(fd)


def compiled_graph_round_trips(
    peer: Any, payload_bytes: int, num_calls: int, warmup: int
) -> list[float]:
    """Round trips through a compiled graph of ``peer.echo``, compiled by the caller."""
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = peer.echo.bind(inp)
    compiled = dag.experimental_compile(_submit_timeout=TIMEOUT_S)
    payload = make_payload(payload_bytes)
    try:
        return round_trips(
            lambda: expect(compiled.execute(payload).get(timeout=TIMEOUT_S), payload),
            num_calls,
            warmup,
        )
    finally:
        compiled.teardown()


class EngineChannelEcho:
    """The engine's own data-plane channel (``cluster.channel``: shared memory and FIFO
    doorbells on one node, ``same_node``; else ZeroMQ over tcp): a ``ChannelServer`` in B that
    echoes every message."""

    def __init__(self, same_node: bool = True) -> None:
        from infinite_llm.cluster.channel import channel_dir
        from infinite_llm.cluster.channel_peers import ChannelServer

        self.token = f"bench-{os.getpid()}-{time.monotonic_ns()}"
        self.server = ChannelServer(
            1, lambda debtor, header, tensors: (header, tensors), channel_dir(self.token)
        )
        self.endpoint = self.server.open(0, same_node=same_node)

    def stop(self) -> str | None:
        from infinite_llm.cluster.channel import remove_channel_dir

        self.server.close()
        remove_channel_dir(self.token)
        return None


def engine_channel_client(
    spec: Any, payload_bytes: int, num_calls: int, warmup: int
) -> list[float]:
    """Round trips on the engine's channel: the array out as a tensor, echoed back."""
    import torch

    from infinite_llm.cluster.channel_peers import ChannelClient

    client = ChannelClient(0, lambda c: spec, lambda c: True, timeout_s=TIMEOUT_S)
    sent = torch.from_numpy(make_payload(payload_bytes))
    try:

        def round_trip() -> None:
            client.send(1, None, [sent])
            (_, tensors) = client.wait([1])[1]
            expect(tensors[0], sent.numpy())

        return round_trips(round_trip, num_calls, warmup)
    finally:
        client.close()
