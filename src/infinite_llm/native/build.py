"""Compile a C kernel at first use, cache the shared library, load it with ctypes.

The library is cached under ``$INFINITE_LLM_KERNEL_CACHE`` (default
``~/.cache/infinite-llm/kernels/``; ``$XDG_CACHE_HOME`` is honoured), named by a hash of the
source, the compiler, its flags and the CPU (``-march=native`` code must not run on another
CPU sharing the home directory). Compilation writes a temporary file and renames it, so
processes racing on a cold cache each end up loading a complete library.

OpenMP: torch ships its own ``libgomp`` and has loaded it already; the kernel is linked against
that very file, so one process has one OpenMP runtime (two would each keep a thread pool and
oversubscribe the cores). Where the compiler cannot do OpenMP the kernel is built serial.

One OpenMP team per process: every thread that opens a parallel region gets a team of worker
threads of its own, kept for the thread's life, and once a process has more of these threads
than cores libgomp parks idle workers at once instead of letting them spin between regions, so
every region of a step starts with futex wake-ups. A SmolLM2 decode step on a thread other than
the one that had loaded the model took 39-58 ms against 30-33 ms (52,185 against 828 context
switches over 150 steps, ``perf stat``). So the thread that loads a model gives its team back
(``release_openmp_team``), and threads that serve others (a Ray actor's channel server) compute
with one thread of their own (``use_openmp_threads_here``), leaving the one team to the thread
that steps.

``INFINITE_LLM_NATIVE=0`` disables native kernels; ``$CC`` picks the compiler (default ``cc``);
``$INFINITE_LLM_NATIVE_CFLAGS`` adds compiler flags (for tuning, e.g. ``-DPREFETCH_TILES=4``).
Every failure is logged once and answered with ``None``: callers fall back to torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-fno-math-errno", "-fno-trapping-math")


@dataclass(frozen=True)
class NativeLibrary:
    lib: ctypes.CDLL
    path: Path
    openmp: bool


def kernel_cache_dir() -> Path:
    explicit = os.environ.get("INFINITE_LLM_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "infinite-llm" / "kernels"


def native_enabled() -> bool:
    return os.environ.get("INFINITE_LLM_NATIVE", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _torch_libgomp() -> Path | None:
    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return path if path.exists() else None


def _libgomp() -> ctypes.CDLL | None:
    path = _torch_libgomp()
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))  # the copy torch loaded: the same runtime
    except OSError:
        return None


def release_openmp_team() -> bool:
    """Give back the calling thread's OpenMP worker threads (``omp_pause_resource_all``): this
    thread is done computing for now, and the next one to open a parallel region gets the
    process's one team (module docstring). False where torch has no libgomp here."""
    gomp = _libgomp()
    if gomp is None or not hasattr(gomp, "omp_pause_resource_all"):
        return False
    gomp.omp_pause_resource_all.argtypes = [ctypes.c_int]
    return gomp.omp_pause_resource_all(1) == 0  # omp_pause_soft


def use_openmp_threads_here(num_threads: int) -> bool:
    """The calling thread's parallel regions use ``num_threads`` from now on (torch's and the
    native kernels', which read ``torch.get_num_threads()``), other threads keep theirs: one
    thread means no team of its own (module docstring). False where torch has no libgomp."""
    gomp = _libgomp()
    if gomp is None:
        return False
    torch.get_num_threads()  # torch sets each thread's count on first use: let it do so first
    gomp.omp_set_num_threads.argtypes = [ctypes.c_int]
    gomp.omp_set_num_threads(num_threads)
    return True


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _attempts(cc: str) -> list[tuple[list[str], list[str], bool]]:
    """(compile flags, link inputs, openmp) to try in order: fastest build first."""
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    native += os.environ.get("INFINITE_LLM_NATIVE_CFLAGS", "").split()
    gomp = _torch_libgomp()
    out: list[tuple[list[str], list[str], bool]] = []
    if gomp is not None:
        link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"]
        out.append(([*BASE_FLAGS, *native, "-fopenmp"], link, True))
    out.append(([*BASE_FLAGS, *native], [], False))
    out.append(([*BASE_FLAGS], [], False))
    return out


def _compile(cc: str, source: Path, target: Path, flags: list[str], link: list[str]) -> str | None:
    """Build ``target``; returns None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        for cmd in (
            [cc, *flags, "-c", str(source), "-o", str(obj)],
            [cc, "-shared", str(obj), *link, "-lm", "-o", str(lib)],
        ):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"{' '.join(cmd)}: {exc}"
            if done.returncode != 0:
                return f"{' '.join(cmd)}: {done.stderr.strip()[-2000:]}"
        os.replace(lib, target)  # atomic: a concurrent loader sees no file or a whole one
    return None


def build_and_load(source: Path) -> NativeLibrary | None:
    """The compiled ``source`` (from the cache when built before), or None with a log line why."""
    if not native_enabled():
        logger.info("native attention kernels disabled by INFINITE_LLM_NATIVE")
        return None
    if not source.exists():
        logger.warning("native kernel source %s is missing; using torch kernels", source)
        return None
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        logger.warning(
            "no C compiler (%s) found; native attention disabled, using torch kernels", cc
        )
        return None
    text = _source_text(source)
    version = _compiler_version(cc)
    errors: list[str] = []
    for flags, link, openmp in _attempts(cc):
        key = hashlib.sha256(
            b"\0".join(
                [
                    text,
                    cc.encode(),
                    version.encode(),
                    " ".join(flags + link).encode(),
                    _cpu_fingerprint().encode(),
                ]
            )
        ).hexdigest()[:20]
        target = kernel_cache_dir() / f"{source.stem}-{key}.so"
        if not target.exists():
            error = _compile(cc, source, target, flags, link)
            if error is not None:
                errors.append(error)
                continue
            logger.info("compiled native kernel %s (%s)", target, " ".join(flags))
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        if not openmp:
            logger.warning(
                "native kernel %s built without OpenMP: it runs on one thread", source.name
            )
        return NativeLibrary(lib, target, openmp)
    logger.warning(
        "could not build native kernel %s; using torch kernels. %s", source.name, " | ".join(errors)
    )
    return None


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _source_text(source: Path, seen: frozenset[Path] = frozenset()) -> bytes:
    """The source and, after it, every local header it includes (``#include "..."``, relative
    to the including file, recursively): what the cached library's name must change with."""
    text = source.read_bytes()
    parts = [text]
    for name in _INCLUDE.findall(text):
        header = (source.parent / name.decode()).resolve()
        if header.exists() and header not in seen:
            parts.append(_source_text(header, seen | {source.resolve(), header}))
    return b"\0".join(parts)


_load_lock = threading.Lock()


def load_once(
    state: dict[str, NativeLibrary | None], source: Path, declare: Callable[[ctypes.CDLL], None]
) -> NativeLibrary | None:
    """``build_and_load(source)`` once per process, its C signatures set by ``declare``: the
    first caller builds (the others wait), every later one gets the same answer, None
    included. ``state`` is the caller's cache (key ``"lib"``; tests may set it)."""
    if "lib" not in state:
        with _load_lock:
            if "lib" not in state:
                native = build_and_load(source)
                if native is not None:
                    declare(native.lib)
                state["lib"] = native
    return state["lib"]
