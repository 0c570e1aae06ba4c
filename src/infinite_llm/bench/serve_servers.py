"""The servers ``bench serve`` measures: ours launched for the run (``LaunchedServer``), vLLM's
own server on the same model as a peer (``peer_server``), and what the client asks of any of
them (the served model's name, the vocabulary its random prompts draw from, the rBlocks it
holds while a run goes on)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from infinite_llm.server.metrics import PREFIX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: str, num_lines: int = 5) -> str:
    """The last lines of a server's log (why it exited: an argparse error, a traceback's end)."""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-num_lines:]).rstrip()


class LaunchedServer:
    """``infinite-llm serve`` with ``server_args`` on a free local port, ready when made."""

    def __init__(self, server_args: list[str], timeout_s: float = 600.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # The log outlives this object (its path is printed on failure): no context manager.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="bench-serve-", suffix=".log", delete=False
        )
        cmd = [
            sys.executable,
            "-m",
            "infinite_llm.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-uvicorn-access-log",
            *server_args,
        ]
        print(f"launching: {shlex.join(cmd)} (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}; see {self.log.name}, "
                    f"which ends:\n{log_tail(self.log.name)}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server did not start in {timeout_s} s; see {self.log.name}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def peer_server(
    peer: str, model: str, prefix_caching: bool = False, max_model_len: int | None = None
) -> Iterator[tuple[str, str]]:
    """vLLM's server (``peer``: ``vllm`` compiled, ``vllm-eager``) on ``model`` exported to a
    Hugging Face directory; yields (base URL, the name requests send), stops it on exit.
    ``prefix_caching`` and ``max_model_len`` (default: the peer's): see ``vllm_server_command``."""
    from infinite_llm.bench.peers.vllm import MAX_MODEL_LEN, start_vllm_server
    from infinite_llm.model.export import export_hf

    with tempfile.TemporaryDirectory(prefix="bench-serve-peer-") as tmp:
        hf_dir = export_hf(model, os.path.join(tmp, "hf"))
        port = free_port()
        log = os.path.join(tempfile.gettempdir(), f"bench-serve-{peer}-{port}.log")
        print(f"launching {peer} on port {port} (log: {log})", file=sys.stderr)
        proc = start_vllm_server(
            hf_dir,
            port=port,
            log_path=log,
            timeout=900.0,
            eager=peer == "vllm-eager",
            prefix_caching=prefix_caching,
            max_model_len=max_model_len or MAX_MODEL_LEN,
        )
        try:
            yield f"http://127.0.0.1:{port}", hf_dir
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def served_model(base_url: str, headers: dict[str, str]) -> str:
    response = httpx.get(base_url + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def vocab_size_of(name: str) -> int:
    """The vocabulary of a model our registry knows (embedded name, tiny, GGUF, HF directory)."""
    from infinite_llm.model.loader import model_dir_for
    from infinite_llm.model.loader.hf_loader import read_hf_arch
    from infinite_llm.model.registry import resolve_model

    return read_hf_arch(model_dir_for(resolve_model(name), progress=False)).vocab_size


def launch_model(server_args: list[str]) -> str:
    """The model ``serve`` loads given ``server_args`` (its ``--model``, else the default)."""
    for i, arg in enumerate(server_args):
        if arg == "--model" and i + 1 < len(server_args):
            return server_args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    from infinite_llm.model.registry import DEFAULT_MODEL

    return DEFAULT_MODEL


async def peak_rblocks(
    client: httpx.AsyncClient, done: asyncio.Event, interval: float = 0.05
) -> int | None:
    """The most rBlocks held by requests (used + lent, every instance) in the server's
    Prometheus metrics, scraped every ``interval`` s until ``done``; None where the server does
    not report them (vLLM), which is then asked only once."""
    peak: int | None = None
    names = (f"{PREFIX}rblocks_used{{", f"{PREFIX}rblocks_lent{{")
    while True:
        try:
            response = await client.get("/metrics")
            text = response.text if response.status_code == 200 else ""
            if PREFIX not in text and response.status_code in (200, 404):
                return peak  # not our metrics: scraping on would only load the server
            held = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(names)
            ]
            if held:
                peak = max(peak or 0, int(sum(held)))
        except httpx.HTTPError:
            pass  # a missed scrape: the next one counts
        if done.is_set():
            return peak
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), interval)
