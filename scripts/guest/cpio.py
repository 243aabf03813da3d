"""The initramfs archive: cpio "newc" (SVR4 without CRC), the format the kernel unpacks.

Each entry is a 110-byte ASCII header (``070701`` and thirteen 8-digit hex fields, in the
order of :data:`NEWC_FIELDS`), the NUL-terminated name padded to 4 bytes, then the data
padded to 4 bytes; the archive ends with the entry ``TRAILER!!!``. Device nodes carry their
numbers in the header, so ``/dev/console`` needs no ``mknod`` (and no root) to be made.
"""

from __future__ import annotations

import stat

__all__ = ["NEWC_FIELDS", "NEWC_MAGIC", "Archive"]

NEWC_MAGIC = b"070701"
# The header's fields after the magic, in order, each 8 hex digits.
NEWC_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Archive:
    """A newc archive built in memory; paths are relative to the root (no leading ``/``)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 0
        self._names: list[str] = []

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if name in self._names:
            raise ValueError(f"{name}: already in the archive")
        self._names.append(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        values = {
            "ino": self._ino,
            "mode": mode,
            "uid": 0,
            "gid": 0,
            "nlink": 2 if stat.S_ISDIR(mode) else 1,
            "mtime": 0,  # reproducible: the same inputs give the same bytes
            "filesize": len(data),
            "devmajor": 0,
            "devminor": 0,
            "rdevmajor": rdev[0],
            "rdevminor": rdev[1],
            "namesize": len(encoded),
            "check": 0,
        }
        header = NEWC_MAGIC + b"".join(b"%08x" % values[f] for f in NEWC_FIELDS)
        self._parts += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def names(self) -> list[str]:
        """Returns the entries' names in the order they were added."""
        return list(self._names)

    def to_bytes(self) -> bytes:
        """Returns the archive, trailer included."""
        trailer = Archive()
        trailer._ino = -1
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._parts + trailer._parts)
