"""ctypes structs built from their C declaration (``csrc/c_struct.h``), never mirrored by hand.

A library that declares ``C_STRUCT_LAYOUT(Name, FIELDS)`` exports ``Name_layout``, its fields
in order (``"q:i k:i ... scale:d"``: int64 or double, 8 bytes each), and ``Name_size``.
``c_struct(lib, "Name")`` turns them into a ``ctypes.Structure`` and checks that ctypes lays it
out in as many bytes as the C compiler did, so a field added on one side only cannot go
unnoticed: there is only one side.
"""

from __future__ import annotations

import ctypes

_TYPES = {"i": ctypes.c_int64, "d": ctypes.c_double}


def layout(lib: ctypes.CDLL, name: str) -> list[tuple[str, str]]:
    """(field, type letter) in order, as the library declares ``name``."""
    first = ctypes.c_char.in_dll(lib, f"{name}_layout")  # a char array: its address is the text
    text = ctypes.cast(ctypes.addressof(first), ctypes.c_char_p).value or b""
    return [tuple(item.split(":")) for item in text.decode().split()]  # type: ignore[misc]


def c_struct(lib: ctypes.CDLL, name: str) -> type[ctypes.Structure]:
    """The ``ctypes.Structure`` of C struct ``name`` in ``lib``; ValueError if the sizes differ."""
    fields = [(field, _TYPES[kind]) for field, kind in layout(lib, name)]
    struct = type(name, (ctypes.Structure,), {"_fields_": fields})
    size = ctypes.c_int64.in_dll(lib, f"{name}_size").value
    if ctypes.sizeof(struct) != size:
        raise ValueError(f"{name}: ctypes lays out {ctypes.sizeof(struct)} bytes, C {size}")
    return struct
