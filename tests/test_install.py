"""A real non-editable install: the native kernels build, load and run from the installed copy.

``make install`` does ``pip install -e``, where the kernels compile from the repository's own
``src/`` and a C file or header missing from ``[tool.setuptools.package-data]`` goes unnoticed
(``test_packaging`` checks the globs, not what a wheel holds). Here the project is installed the
way a user gets it: a wheel built from a copy of the repository, installed into a fresh venv.

The fresh venv borrows the test interpreter's dependencies (torch, ...) through a ``.pth`` file
listing its site-packages: a ``.pth`` line only appends a path, it does not make a site dir, so
that directory's own ``.pth`` files (the editable install's, pointing at ``src/``) are not read
and the repository cannot leak in. The check script asserts so (``sys.path``, the package's
``__file__``), compiles every kernel into an empty cache and compares them with torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from: the project metadata and the package (build outputs left behind).
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg")

CHECK = r"""
import logging, os, sys
from pathlib import Path

logging.basicConfig(level=logging.INFO)  # build_and_load logs why a kernel could not be had
venv, repo, cache = (Path(a).resolve() for a in sys.argv[1:4])

import infinite_llm

package = Path(infinite_llm.__file__).resolve()
assert venv in package.parents, f"infinite_llm imported from {package}, not from {venv}"
# no other copy reachable: neither this repository's src/ nor another checkout's (the outer
# environment's site-packages, which may sit inside the repository, lends only dependencies)
leaks = [
    p for p in sys.path
    if p and (Path(p).resolve() == repo / "src" or (Path(p) / "infinite_llm").is_dir())
    and not Path(p).resolve().is_relative_to(venv)
]
assert not leaks, f"another infinite_llm is on sys.path: {leaks}"

import torch

from infinite_llm.attention import cpu_native, cpu_prefill
from infinite_llm.native import build as native_build
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.reference import micro_attention_reference
from infinite_llm.model import native_decoder, native_linear, native_norm
from infinite_llm.cluster import native_plane

assert native_build.kernel_cache_dir().resolve() == cache
modules = {
    "attention.cpu_native": cpu_native,
    "attention.cpu_prefill": cpu_prefill,
    "cluster.native_plane": native_plane,
    "model.native_linear": native_linear,
    "model.native_norm": native_norm,
    "model.native_decoder": native_decoder,
}
libs = {
    name: (module.library if module is native_plane else module.native_library)()
    for name, module in modules.items()
}
missing = [name for name, lib in libs.items() if lib is None]
assert not missing, f"native libraries not built from the installed copy: {missing}"
for name, lib in libs.items():
    assert lib.path.resolve().parent == cache, f"{name} loaded {lib.path}, not from the new cache"

gen = torch.Generator().manual_seed(0)
close = dict(rtol=1e-4, atol=1e-4)

# MicroAttention, decode rows over shuffled rBlocks: GQA (6 query heads on 2 KV heads)
hq, hkv, d, bs, num_blocks = 6, 2, 64, 16, 24
k = torch.randn(hkv, num_blocks, bs, d, generator=gen)
v = torch.randn(hkv, num_blocks, bs, d, generator=gen)
order = torch.randperm(num_blocks, generator=gen).tolist()
ctxs = [1, 40, 100, 33]
block_ids, used = [], 0
for c in ctxs:
    n = -(-c // bs)
    block_ids.append(order[used : used + n])
    used += n
batch = MABatch([1, 2, 1, 1], block_ids, ctxs, bs)
q = torch.randn(batch.num_query_rows, hq, d, generator=gen)
out, lse = cpu_native.micro_attention_native(q, k, v, batch, d**-0.5)
ref_out, ref_lse = micro_attention_reference(q, k, v, batch, d**-0.5)
torch.testing.assert_close(out, ref_out, **close)
torch.testing.assert_close(lse, ref_lse, **close)

# causal self-attention of two prefill chunks (9 and 20 tokens), from strided views of one qkv
qkv = torch.randn(29, hq + 2 * hkv, d, generator=gen)
qs, ks, vs = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
got = cpu_prefill.causal_self_attention_native(qs, ks, vs, [9, 20], d**-0.5)
assert got is not None, "native prefill attention declined float32 strided views"
for r0, n in ((0, 9), (9, 20)):
    qh = qs[r0 : r0 + n].transpose(0, 1)
    kh = ks[r0 : r0 + n].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    vh = vs[r0 : r0 + n].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    torch.testing.assert_close(got[0][r0 : r0 + n], want.transpose(0, 1), **close)

# linear (panel-packed; 40 outputs = two whole panels and a part), RMSNorm, silu * up
w, b, x = torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen), torch.randn(5, 96)
torch.testing.assert_close(
    native_linear.NativeLinear(w, b)(x), torch.nn.functional.linear(x, w, b), **close
)
weight = torch.randn(96, generator=gen)
want = torch.nn.functional.rms_norm(x, (96,), weight, 1e-5)
got = native_norm.rms_norm(x, weight, 1e-5)
assert got is not None, "native rms_norm declined a float32 contiguous input"
torch.testing.assert_close(got, want, **close)
gate_up = torch.randn(5, 64, generator=gen)
got = native_decoder.silu_mul(gate_up)
assert got is not None, "native silu_mul declined a float32 contiguous input"
torch.testing.assert_close(got, torch.nn.functional.silu(gate_up[:, :32]) * gate_up[:, 32:], **close)
assert native_plane.sizes(1, 1, 6, 2, 64)[0] > 0  # the data plane's library answers
print("installed native kernels OK:", ", ".join(f"{n}={l.path.name}" for n, l in libs.items()))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    shown = " ".join("<check script>" if a == CHECK else a for a in cmd)
    assert done.returncode == 0, (
        f"{shown} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
        f"--- stderr\n{done.stderr[-6000:]}"
    )
    return done


def _copy_project(dest: Path) -> None:
    """The files a wheel is built from, so setuptools' build/ and egg-info land in ``dest``."""
    dest.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "src",
        dest / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.o"),
    )


def test_non_editable_install_builds_and_runs_native_kernels(tmp_path: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the native kernels cannot be built here")
    start = time.perf_counter()
    project, venv, cache, work = (tmp_path / n for n in ("project", "venv", "cache", "cwd"))
    _copy_project(project)
    cache.mkdir()
    work.mkdir()

    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "outer-deps.pth").write_text("".join(f"{p}\n" for p in outer))

    # The outer pip installs into the new interpreter (--python); no index, no build isolation:
    # setuptools comes from the outer site-packages, nothing is downloaded.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            str(project),
        ]
    )
    assert (site / "infinite_llm" / "__init__.py").is_file(), "pip installed no package files"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "INFINITE_LLM_"))}
    env["INFINITE_LLM_KERNEL_CACHE"] = str(cache)
    done = _run([str(python), "-c", CHECK, str(venv), str(ROOT), str(cache)], cwd=work, env=env)
    assert "installed native kernels OK" in done.stdout
    assert len(list(cache.glob("*.so"))) == 6, sorted(p.name for p in cache.iterdir())
    print(f"install + build + check: {time.perf_counter() - start:.1f} s")
