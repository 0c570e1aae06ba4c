"""A non-editable install carries every source file the native kernels compile from."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "infinite_llm"


def test_package_data_lists_every_native_source_and_header():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["infinite_llm"]
    sources = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.suffix in {".c", ".h", ".cpp", ".cu", ".cuh"}
    ]
    assert sources, "no native sources found under src/infinite_llm"
    missing = [s for s in sources if not any(fnmatch(s, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
