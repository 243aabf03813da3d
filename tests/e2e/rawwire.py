"""A deliberately independent, minimal implementation of the wire framing for tests.

It lets tests send what the product client never would (garbage, lies, refused patches)
and cross-checks the agent against docs/protocol.md rather than against our own client.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

MAGIC = 0x31584250
HEADER = struct.Struct("<IHHII")


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def frame(
    mtype: int,
    payload: bytes = b"",
    *,
    seq: int = 7,
    magic: int = MAGIC,
    version: int = 1,
    length: int | None = None,
) -> bytes:
    return (
        HEADER.pack(magic, version, mtype, seq, len(payload) if length is None else length)
        + payload
    )


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_reply(s: socket.socket) -> tuple[int, int, int, bytes]:
    """Returns (type, seq, status, rest of payload)."""
    magic, version, mtype, seq, length = HEADER.unpack(recv_exact(s, HEADER.size))
    assert magic == MAGIC and version == 1
    payload = recv_exact(s, length)
    (status,) = struct.unpack_from("<i", payload)
    return mtype, seq, status, payload[4:]


def error_text(rest: bytes) -> str:
    (n,) = struct.unpack_from("<H", rest)
    return rest[2 : 2 + n].decode()


def request(path: Path, mtype: int, payload: bytes = b"") -> tuple[int, bytes]:
    """Returns (status, rest) of one request on a fresh connection."""
    with connect(path) as s:
        s.sendall(frame(mtype, payload))
        rtype, seq, status, rest = recv_reply(s)
        assert rtype == mtype | 0x80 and seq == 7
        return status, rest
