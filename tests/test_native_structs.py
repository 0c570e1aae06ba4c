"""The argument structs shared by C and ctypes are declared once, in C, and checked at load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infinite_llm.attention import cpu_native
from infinite_llm.cluster import native_plane
from infinite_llm.model import native_decoder
from infinite_llm.native import structs
from infinite_llm.native.build import build_and_load

SRC = Path(__file__).resolve().parents[1] / "src" / "infinite_llm"
needs_native = pytest.mark.skipif(
    cpu_native.native_library() is None
    or native_decoder.native_library() is None
    or native_plane.library() is None,
    reason="native kernels could not be built here",
)


def _declared(header: Path, macro: str) -> list[tuple[str, str]]:
    """(field, i or d) of ``#define MACRO(I, F) ...`` in a C file, read from its text."""
    text = header.read_text().replace("\\\n", " ")
    body = re.search(rf"#define {macro}\(I, F\)(.*)", text)
    assert body, f"{macro} not found in {header}"
    return [
        (name, "i" if kind == "I" else "d")
        for kind, name in re.findall(r"\b([IF])\((\w+)\)", body.group(1))
    ]


@needs_native
@pytest.mark.parametrize(
    ("library", "name", "source", "macro"),
    [
        ("attention", "MADecodeCall", "attention/csrc/ma_call.h", "MA_DECODE_CALL"),
        ("attention", "MAShardsCall", "attention/csrc/ma_call.h", "MA_SHARDS_CALL"),
        ("attention", "StepAttention", "attention/csrc/ma_call.h", "STEP_ATTENTION"),
        ("decoder", "LayerWeights", "model/csrc/decoder.c", "LAYER_WEIGHTS"),
        ("decoder", "DecodeStep", "model/csrc/decoder.c", "DECODE_STEP"),
        ("data_plane", "RemoteLink", "cluster/csrc/data_plane.h", "REMOTE_LINK"),
        ("data_plane", "RemoteStep", "cluster/csrc/data_plane.h", "REMOTE_STEP"),
        ("data_plane", "ServeLink", "cluster/csrc/data_plane.h", "SERVE_LINK"),
    ],
)
def test_ctypes_structs_are_the_c_declarations(library, name, source, macro) -> None:
    native = {"attention": cpu_native.native_library, "decoder": native_decoder.native_library}
    lib = native.get(library, native_plane.library)().lib
    declared = _declared(SRC / source, macro)
    assert structs.layout(lib, name) == declared  # the library exports what the source declares
    struct = structs.c_struct(lib, name)
    assert [f for f, _ in struct._fields_] == [f for f, _ in declared]
    assert [getattr(struct, f).offset for f, _ in declared] == [8 * i for i in range(len(declared))]


def test_a_struct_whose_size_disagrees_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("INFINITE_LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "bad.c"
    source.write_text(
        '#include <stdint.h>\nconst char Bad_layout[] = "a:i b:d ";\nconst int64_t Bad_size = 24;\n'
    )
    native = build_and_load(source)
    if native is None:
        pytest.skip("no C compiler here")
    assert structs.layout(native.lib, "Bad") == [("a", "i"), ("b", "d")]
    with pytest.raises(ValueError, match="Bad: ctypes lays out 16 bytes, C 24"):
        structs.c_struct(native.lib, "Bad")
