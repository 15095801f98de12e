"""Copying a GGUF file's metadata with the Python `gguf` package, shared by the scripts that
write one model out of another (`truncated-draft`, `dequantized-target`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import gguf


def open_writer(reader: gguf.GGUFReader, out, edit: Callable[[str, Any], Any] | None = None):
    """A writer for `out` with `reader`'s architecture, alignment and every metadata field,
    each value passed through `edit(name, value)` when given."""
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        sys.exit("the model has no general.architecture")
    arch = arch_field.contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if edit is not None:
            value = edit(field.name, value)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    return writer
