"""``infinite-llm bench channels``: round trip of one small message between two Ray actors, per channel.

Per model layer, a debtor instance sends each of its creditors one small message (its queries
and the new K,V: a few KB) and waits for the reply (the partial output and its lse: a few KB).
The channels below are the candidates for that per-layer data plane between instance actors;
this probe measures what one such round trip costs on each, on this machine.

Two actors on this node (threaded, as the instance actors are; ``num_cpus=0`` each): A sends a
``--payload-bytes`` float32 array to B, B echoes it (same size back), A waits for it. Timed
inside A (``perf_counter`` around each round trip) over ``--calls`` calls after a warm-up;
reported as the median and the 90th percentile in microseconds. Candidates:

  ray_call            ``B.echo.remote(array)`` and ``ray.get``: a plain Ray actor call
  ray_compiled_graph  a Ray Compiled Graph with B's echo as its one node, compiled and executed
                      by A (by the driver if A cannot own it: the row then says so)
  gloo                ``torch.distributed`` (gloo, world size 2): A send/recv, B recv/send
  zmq_ipc, zmq_tcp    pyzmq DEALER (A) -> ROUTER (B, echo in a thread of the actor)
  engine_channel_zmq  the engine's data plane between nodes (``cluster.channel``: the same
                      messages of tensors, a ZeroMQ DEALER to B's ROUTER over tcp)
  engine_channel      the engine's data plane on one node (``cluster.channel``): the message in
                      shared memory, a doorbell through a named FIFO each way
  pipe_floor          one byte each way over two named FIFOs: what waking another process and
                      being woken back costs here, the floor of any channel between processes

Every wait has a timeout; a candidate that fails gets a row with its ``error``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from infinite_llm.bench.channel_echoes import (
    TIMEOUT_S,
    EchoThread,
    EngineChannelEcho,
    compiled_graph_round_trips,
    engine_channel_client,
    expect,
    make_payload,
    pipe_client,
    round_trips,
    zmq_client,
)
from infinite_llm.bench.common import emit, format_table, machine_info

CANDIDATES = (
    "ray_call",
    "ray_compiled_graph",
    "gloo",
    "zmq_ipc",
    "zmq_tcp",
    "engine_channel_zmq",
    "engine_channel",
    "pipe_floor",
)
ACTOR_PREFIX = "bench-channels-"


def warmup_calls(num_calls: int) -> int:
    """Untimed round trips before the timed ones: a fresh channel's first tens are slow."""
    return max(20, num_calls // 10)


class _Peer:
    """Both ends: A runs the clients (``*_client`` / ``measure_*``), B the echoes."""

    def __init__(self) -> None:
        self.echoes: dict[str, EchoThread | EngineChannelEcho] = {}

    def ready(self) -> int:
        return os.getpid()

    def echo(self, x: Any) -> Any:
        return x

    # B
    def start_echo(self, kind: str) -> Any:
        self.stop_echo(kind)
        engine = kind.startswith("engine_channel")
        self.echoes[kind] = (
            EngineChannelEcho(same_node=kind == "engine_channel") if engine else EchoThread(kind)
        )
        return self.echoes[kind].endpoint

    def stop_echo(self, kind: str) -> str | None:
        echo = self.echoes.pop(kind, None)
        return echo.stop() if echo is not None else None

    # A
    def measure_ray_call(
        self, peer: Any, payload_bytes: int, num_calls: int, warmup: int
    ) -> list[float]:
        import ray

        payload = make_payload(payload_bytes)
        return round_trips(
            lambda: expect(ray.get(peer.echo.remote(payload), timeout=TIMEOUT_S), payload),
            num_calls,
            warmup,
        )

    def measure_compiled_graph(
        self, peer: Any, payload_bytes: int, num_calls: int, warmup: int
    ) -> list[float]:
        return compiled_graph_round_trips(peer, payload_bytes, num_calls, warmup)

    def measure_echo_client(
        self, kind: str, endpoint: Any, payload_bytes: int, num_calls: int, warmup: int
    ) -> list[float]:
        if kind == "pipe_floor":
            return pipe_client(endpoint, num_calls, warmup)
        if kind.startswith("engine_channel"):
            return engine_channel_client(endpoint, payload_bytes, num_calls, warmup)
        return zmq_client(endpoint, payload_bytes, num_calls, warmup)

    # both: rank 0 (A) measures, rank 1 (B) echoes
    def gloo(
        self, rank: int, init_method: str, payload_bytes: int, num_calls: int, warmup: int
    ) -> list[float]:
        import torch
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        try:
            payload = torch.from_numpy(make_payload(payload_bytes))
            reply = torch.empty_like(payload)
            if rank == 1:
                for _ in range(warmup + num_calls):
                    dist.recv(reply, src=0)
                    dist.send(reply, dst=0)
                return []
            return round_trips(
                lambda: (dist.send(payload, dst=1), dist.recv(reply, src=1)), num_calls, warmup
            )
        finally:
            dist.destroy_process_group()


# -- the driver -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(error: BaseException) -> str:
    """The error an actor raised (not Ray's wrapper around it), on one line."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class _Pair:
    """Actors A and B on this node; replaced after a candidate that may have left them stuck."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.names = [f"{ACTOR_PREFIX}{uuid.uuid4().hex[:8]}-{end}" for end in "ab"]
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cls = ray.remote(_Peer)
        self.a, self.b = (
            cls.options(
                name=name, num_cpus=0, max_concurrency=4, max_restarts=0, scheduling_strategy=here
            ).remote()
            for name in self.names
        )
        try:
            ray.get([self.a.ready.remote(), self.b.ready.remote()], timeout=4 * TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """Kills both and waits (bounded) until Ray no longer lists them."""
        import ray

        for actor in (self.a, self.b):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and set(self.names) & set(ray.util.list_named_actors()):
            time.sleep(0.05)


def _measure(pair: _Pair, name: str, payload_bytes: int, num_calls: int, warmup: int) -> dict:
    """One candidate's samples (seconds) and where they were taken; raises what went wrong."""
    import ray

    a, b = pair.a, pair.b
    wait_s = 2 * TIMEOUT_S + (num_calls + warmup) * 0.05  # a backstop: A's own waits time out
    args = (payload_bytes, num_calls, warmup)
    if name == "ray_call":
        return {"samples": ray.get(a.measure_ray_call.remote(b, *args), timeout=wait_s)}
    if name == "ray_compiled_graph":
        try:
            samples = ray.get(a.measure_compiled_graph.remote(b, *args), timeout=wait_s)
            return {"samples": samples}
        except ray.exceptions.GetTimeoutError:
            raise
        except Exception as e:  # A cannot own the graph: the driver does
            note = f"in actor: {_describe(e)}"
            return {
                "samples": compiled_graph_round_trips(b, *args),
                "measured_in": "driver",
                "note": note,
            }
    if name == "gloo":
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        refs = [a.gloo.remote(0, init_method, *args), b.gloo.remote(1, init_method, *args)]
        return {"samples": ray.get(refs, timeout=wait_s)[0]}
    if name in ("zmq_ipc", "zmq_tcp", "engine_channel_zmq", "engine_channel", "pipe_floor"):
        endpoint = ray.get(b.start_echo.remote(name), timeout=2 * TIMEOUT_S)
        try:
            samples = ray.get(a.measure_echo_client.remote(name, endpoint, *args), timeout=wait_s)
        finally:
            echo_error = ray.get(b.stop_echo.remote(name), timeout=2 * TIMEOUT_S)
        if echo_error:
            raise RuntimeError(echo_error)
        return {"samples": samples}
    raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")


def measure_channels(
    payload_bytes: int = 4096, num_calls: int = 500, candidates: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per candidate: median and p90 round trip (µs) of a ``payload_bytes`` message
    from actor A to actor B and back, over ``num_calls`` after a warm-up, timed in A (or where
    ``measured_in`` says), or the ``error`` that stopped it. Starts Ray unless it is up (and
    then shuts it down again); the actors are gone when it returns."""
    import ray

    from infinite_llm.cluster.ray_runtime import init_ray

    names = list(CANDIDATES if candidates is None else candidates)
    warmup = warmup_calls(num_calls)
    started = init_ray()
    pair: _Pair | None = None
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            row: dict[str, Any] = {
                "candidate": name,
                "payload_bytes": payload_bytes,
                "calls": num_calls,
            }
            if name not in CANDIDATES:
                row["error"] = f"unknown candidate; choose from {', '.join(CANDIDATES)}"
                rows.append(row)
                continue
            try:
                if pair is None:
                    pair = _Pair()
                got = _measure(pair, name, payload_bytes, num_calls, warmup)
                samples = got.pop("samples")
                row.update({"measured_in": "actor", **got})
                row.update(
                    {
                        "median_us": statistics.median(samples) * 1e6,
                        "p90_us": _percentile(samples, 90) * 1e6,
                        "min_us": min(samples) * 1e6,
                    }
                )
            except Exception as e:
                row["error"] = _describe(e)
                if pair is not None:  # an actor may be stuck in a wait: start afresh
                    pair.kill()
                    pair = None
            rows.append(row)
    finally:
        if pair is not None:
            pair.kill()
        if started and ray.is_initialized():
            ray.shutdown()
    floor = next((r for r in rows if r["candidate"] == "pipe_floor" and "median_us" in r), None)
    for row in rows:
        if floor is not None and "median_us" in row:
            row["vs_floor_x"] = row["median_us"] / floor["median_us"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench channels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--payload-bytes", type=int, default=4096, help="each way, per call")
    parser.add_argument("--calls", type=int, default=500, help="round trips timed per candidate")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    load_avg_1m = os.getloadavg()[0]  # others' load weighs on every wake-up measured here
    rows = measure_channels(args.payload_bytes, args.calls, args.candidates)
    result = {
        "bench": "channels",
        "payload_bytes": args.payload_bytes,
        "calls": args.calls,
        "warmup": warmup_calls(args.calls),
        "machine": {**machine_info(), "cpus": os.cpu_count(), "load_avg_1m": load_avg_1m},
        "results": rows,
    }
    columns = ["candidate", "median_us", "p90_us", "min_us", "vs_floor_x", "measured_in", "error"]
    table = format_table(
        rows,
        columns,
        f"bench channels ({args.payload_bytes} bytes each way, "
        f"{args.calls} round trips per candidate)",
    )
    notes = [f"{r['candidate']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        table += "\n" + "\n".join(notes)
    emit(result, table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
