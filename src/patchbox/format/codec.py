"""Bounds-checked little-endian reader and writer for the wire and file encodings.

``str`` = u16 length + UTF-8, ``blob`` = u32 length + bytes, ``kv`` = u16 count of str
pairs (docs/protocol.md "Field encodings"). :func:`read_fields` and :func:`write_fields`
follow a declared layout (tuples of :class:`patchbox.wire.Field`, generated from
wire/constants.toml) so that no encoder or decoder writes a layout down again.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from patchbox.errors import PatchFormatError
from patchbox.wire import Field

__all__ = ["Reader", "Writer", "read_fields", "write_fields", "min_size", "INT_SIZES"]

# Bytes of each integer kind of a layout, and the kind of each length or count prefix.
INT_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "i32": 4, "i64": 8}
_U16_MAX = 0xFFFF
_PREFIX = {"bytes8": "u8", "bytes16": "u16", "list16": "u16", "list32": "u32"}

# The classes define a `str` method (the wire field type): annotations say Text instead.
Text = str


class Reader:
    """Reads fields from a buffer; any overrun raises ``error`` naming the field."""

    def __init__(
        self, buf: bytes, error: type[Exception] = PatchFormatError, what: Text = "payload"
    ) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.error = error
        self.what = what

    def _take(self, n: int, field: Text) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.error(
                f"{self.what} truncated: field {field!r} needs {n} bytes at offset "
                f"{self.pos}, {len(self.buf) - self.pos} left"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def _int(self, fmt: Text, field: Text) -> int:
        size = struct.calcsize(fmt)
        value: int = struct.unpack(fmt, self._take(size, field))[0]
        return value

    def u8(self, field: Text) -> int:
        return self._int("<B", field)

    def u16(self, field: Text) -> int:
        return self._int("<H", field)

    def u32(self, field: Text) -> int:
        return self._int("<I", field)

    def u64(self, field: Text) -> int:
        return self._int("<Q", field)

    def i32(self, field: Text) -> int:
        return self._int("<i", field)

    def i64(self, field: Text) -> int:
        return self._int("<q", field)

    def raw(self, n: int, field: Text) -> bytes:
        return bytes(self._take(n, field))

    def str(self, field: Text) -> Text:
        data = self.raw(self.u16(field + " length"), field)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.error(f"{self.what}: field {field!r} is not UTF-8") from err

    def blob(self, field: Text) -> bytes:
        return self.raw(self.u32(field + " length"), field)

    def kv(self, field: Text) -> dict[Text, Text]:
        count = self.u16(field + " count")
        out: dict[Text, Text] = {}
        for _ in range(count):
            key = self.str(field + " key")
            out[key] = self.str(field + " value")
        return out

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def end(self) -> None:
        """Raises if bytes are left after the last field."""
        if self.remaining():
            raise self.error(f"{self.what}: {self.remaining()} trailing bytes after the last field")


class Writer:
    """Accumulates fields; ``bytes(writer)`` is the encoding."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self.parts.append(struct.pack("<B", v))
        return self

    def u16(self, v: int) -> Writer:
        self.parts.append(struct.pack("<H", v))
        return self

    def u32(self, v: int) -> Writer:
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> Writer:
        self.parts.append(struct.pack("<Q", v))
        return self

    def i32(self, v: int) -> Writer:
        self.parts.append(struct.pack("<i", v))
        return self

    def i64(self, v: int) -> Writer:
        self.parts.append(struct.pack("<q", v))
        return self

    def raw(self, data: bytes) -> Writer:
        self.parts.append(bytes(data))
        return self

    def str(self, s: Text) -> Writer:
        data = s.encode("utf-8")
        if len(data) > _U16_MAX:
            raise ValueError("string too long for a u16 length")
        return self.u16(len(data)).raw(data)

    def blob(self, data: bytes) -> Writer:
        return self.u32(len(data)).raw(data)

    def kv(self, items: dict[Text, Text]) -> Writer:
        self.u16(len(items))
        for key, value in items.items():
            self.str(key).str(value)
        return self

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


@functools.cache
def min_size(fields: tuple[Field, ...]) -> int:
    """Returns the fewest bytes an entry of layout ``fields`` takes: lengths and counts at
    their lower bound, ``when`` and ``optional`` fields absent (PBX_<LAYOUT>_MIN_SIZE in C)."""
    total = 0
    for f in fields:
        if f.when is not None or f.optional:
            continue
        if f.kind in INT_SIZES:
            total += INT_SIZES[f.kind]
        elif f.kind in ("str", "kv"):
            total += 2
        elif f.kind == "blob":
            total += 4
        else:
            total += INT_SIZES[_PREFIX[f.kind]] + f.lo * (min_size(f.record) if f.record else 1)
    return total


def write_fields(w: Writer, fields: tuple[Field, ...], value: object) -> None:
    """Writes the attributes of ``value`` named by ``fields``, in their order and encoding;
    a list field writes each item of the attribute as an entry of its record."""
    for f in fields:
        if f.when is not None and getattr(value, f.when[0]) != f.when[1]:
            continue
        v: Any = getattr(value, f.name, 0)  # a field the model lacks (`reserved`) is 0
        if f.kind in INT_SIZES:
            getattr(w, f.kind)(int(v))
        elif f.kind in ("str", "blob", "kv"):
            getattr(w, f.kind)(v)
        else:
            getattr(w, _PREFIX[f.kind])(len(v))
            if f.record:
                for item in v:
                    write_fields(w, f.record, item)
            else:
                w.raw(v)


def read_fields(r: Reader, fields: tuple[Field, ...], where: Text = "") -> dict[Text, Any]:
    """Returns the fields read as a dict; lists as lists of dicts. A length or count outside
    its ``lo``..``hi``, or a count of entries the rest cannot hold, raises ``r.error``
    before anything of it is read. An ``optional`` field the input ends before (written
    before the field existed) is left out of the dict."""
    out: dict[Text, Any] = {}
    for f in fields:
        if f.when is not None and out.get(f.when[0]) != f.when[1]:
            continue
        if f.optional and r.remaining() == 0:
            continue
        label = f"{where}{f.name}"
        if f.kind in INT_SIZES or f.kind in ("str", "blob", "kv"):
            out[f.name] = getattr(r, f.kind)(label)
            continue
        n = getattr(r, _PREFIX[f.kind])(f"{label} {'count' if f.record else 'length'}")
        if not f.lo <= n <= (f.hi if f.hi is not None else n):
            what = f"{n} {f.name}" if f.record else f"{label} length {n}"
            raise r.error(f"{r.what}: {what} out of range ({f.lo}..{f.hi} allowed)")
        if not f.record:
            out[f.name] = r.raw(n, label)
            continue
        # A garbage count must not loop billions of times before the payload runs out.
        if n * min_size(f.record) > r.remaining():
            raise r.error(f"{r.what}: {where}{f.count} {n} overruns the {r.remaining()} bytes left")
        out[f.name] = [read_fields(r, f.record, f"{where}{f.item}[{i}].") for i in range(n)]
    return out
