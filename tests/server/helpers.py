"""Servers for the tests: a real ``infinite-llm serve`` subprocess, or uvicorn on a thread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m infinite_llm.cli.main serve ARGS`` on a free loopback port, log to a file."""

    def __init__(
        self, args: list[str], startup_timeout_s: float = 180.0, wait: bool = True
    ) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)  # noqa: SIM115
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        cmd = [
            sys.executable,
            "-m",
            "infinite_llm.cli.main",
            "serve",
            "--port",
            str(self.port),
            "--disable-uvicorn-access-log",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
        self.ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> ServerProcess:
        """Block until ``/health`` answers 200 (the model is loaded and the engine runs)."""
        if self.ready:
            return self
        timeout_s = self.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    self.ready = True
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class ThreadServer:
    """uvicorn serving an app on a thread of this process (for the special configurations)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def cluster(base_url: str, **kwargs: Any) -> dict[str, Any]:
    response = httpx.get(base_url + "/v1/cluster", timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def is_clean(snap: dict[str, Any]) -> bool:
    """Every rBlock free on every instance, the ledger empty, nothing running or waiting."""
    return (
        all(
            i["free"] == i["num_blocks"]
            and i["lent"] == i["borrowed"] == i["used"] == 0
            and i["running"] == i["waiting"] == 0
            and all(o is None for o in i["block_owners"])
            for i in snap["instances"]
        )
        and snap["ledger"] == []
        and snap["requests"] == {"running": 0, "waiting": 0}
    )


def wait_clean(base_url: str, timeout_s: float = 20.0, **kwargs: Any) -> dict[str, Any]:
    """The cluster snapshot once it is clean; fails with the last snapshot otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = cluster(base_url, **kwargs)
        if is_clean(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(
                f"cluster not clean after {timeout_s} s: instances="
                f"{[{k: v for k, v in i.items() if k != 'block_owners'} for i in snap['instances']]}"
                f" ledger={snap['ledger']} requests={snap['requests']}"
            )
        time.sleep(0.1)
