"""Bounds-checked little-endian reader and writer for the wire and file encodings.

``str`` = u16 length + UTF-8, ``blob`` = u32 length + bytes, ``kv`` = u16 count of str
pairs (docs/protocol.md "Field encodings").
"""

from __future__ import annotations

import struct

from patchbox.errors import PatchFormatError

__all__ = ["Reader", "Writer"]

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
        return struct.unpack(fmt, self._take(size, field))[0]

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
        if len(data) > 0xFFFF:
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
