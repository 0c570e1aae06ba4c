"""kvcache/ is pure Python: it imports only the standard library and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import infinite_llm.kvcache as kvcache

KVCACHE_DIR = Path(kvcache.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_kvcache_imports_only_stdlib_and_itself():
    files = sorted(KVCACHE_DIR.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = top in sys.stdlib_module_names or name.startswith("infinite_llm.kvcache")
            assert allowed, f"{path.name} imports {name}"
