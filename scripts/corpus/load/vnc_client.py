"""A VNC (RFB 3.8) client for QEMU's clipboard fixes: security type None, and the
extended clipboard pseudo-encoding (``0xc0a1e5ce``, the ``ClientCutText`` /
``ServerCutText`` messages with a negative length: flags, then zlib data).

Only what the probes need: no framebuffer is ever requested, so the server sends nothing
but clipboard messages.
"""

from __future__ import annotations

import socket
import struct
import zlib

__all__ = [
    "CAPS",
    "NOTIFY",
    "PROVIDE",
    "REQUEST",
    "TEXT",
    "Vnc",
]

# ui/vnc.h: VNC_CLIPBOARD_*
TEXT = 1 << 0
CAPS = 1 << 24
REQUEST = 1 << 25
NOTIFY = 1 << 27
PROVIDE = 1 << 28
CLIPBOARD_EXT = 0xC0A1E5CE  # VNC_ENCODING_CLIPBOARD_EXT
CLIENT_SET_ENCODINGS, CLIENT_CUT_TEXT, SERVER_CUT_TEXT = 2, 6, 3


class Vnc:
    """One RFB connection to a Unix socket, past ServerInit; with ``clipboard``, the
    extended clipboard announced and the server's capabilities read."""

    def __init__(self, path: str, *, clipboard: bool, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        version = self._recv(12)
        if not version.startswith(b"RFB 003."):
            raise OSError(f"not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        types = self._recv(self._recv(1)[0])
        if 1 not in types:
            raise OSError(f"no security type None offered: {list(types)}")
        self.sock.sendall(b"\x01")
        if struct.unpack(">I", self._recv(4))[0] != 0:
            raise OSError("security handshake failed")
        self.sock.sendall(b"\x01")  # ClientInit: shared
        self._recv(2 + 2 + 16)  # width, height, pixel format
        self._recv(struct.unpack(">I", self._recv(4))[0])  # name
        self.caps = 0
        if clipboard:
            msg = struct.pack(">BxHI", CLIENT_SET_ENCODINGS, 1, CLIPBOARD_EXT)
            self.sock.sendall(msg)
            flags, _ = self.read_clipboard()
            if not flags & CAPS:
                raise OSError(f"the server announced no clipboard capabilities: {flags:#x}")
            self.caps = flags

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the VNC server closed the connection")
            buf += chunk
        return buf

    def read_clipboard(self) -> tuple[int, bytes]:
        """Returns (flags, payload after the flags) of the next extended ServerCutText."""
        kind = self._recv(1)[0]
        if kind != SERVER_CUT_TEXT:
            raise OSError(f"unexpected server message {kind}")
        self._recv(3)
        (length,) = struct.unpack(">i", self._recv(4))
        if length >= 0:
            raise OSError("a classic ServerCutText where an extended one was expected")
        body = self._recv(-length)
        return struct.unpack(">I", body[:4])[0], body[4:]

    def send_extended(self, flags: int, payload: bytes = b"") -> None:
        """Sends an extended ClientCutText: ``flags`` and ``payload``."""
        length = -(4 + len(payload))
        self.sock.sendall(struct.pack(">Bxxxi", CLIENT_CUT_TEXT, length))
        self.sock.sendall(struct.pack(">I", flags) + payload)

    def send_text(self, text: bytes) -> None:
        """Sends a classic ClientCutText (Latin-1 text, possibly empty)."""
        self.sock.sendall(struct.pack(">BxxxI", CLIENT_CUT_TEXT, len(text)) + text)

    @staticmethod
    def text_payload(text: bytes) -> bytes:
        """Returns the zlib stream of a text provide: its size (with the NUL), the text."""
        data = text + b"\0"
        return zlib.compress(struct.pack(">I", len(data)) + data)

    @staticmethod
    def text_of(payload: bytes) -> bytes:
        """Returns the text of a provide's zlib payload."""
        raw = zlib.decompress(payload)
        (size,) = struct.unpack(">I", raw[:4])
        return raw[4 : 4 + size].rstrip(b"\0")

    def close(self) -> None:
        self.sock.close()
