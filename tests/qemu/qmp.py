"""A small QMP client (JSON over a Unix socket) for the QEMU tests."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMP:
    """One QMP session: greeting, capabilities negotiation, then commands."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting, greeting
        assert "return" in self.execute_raw("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:  # events are not answers
                return msg

    def execute_raw(self, command: str, **arguments: object) -> dict[str, Any]:
        req: dict[str, object] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        return self._read()

    def execute(self, command: str, **arguments: object) -> Any:
        """Returns the command's "return" value; raises on a QMP error."""
        reply = self.execute_raw(command, **arguments)
        if "return" not in reply:
            raise RuntimeError(f"{command} failed: {reply}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        out: str = self.execute("human-monitor-command", **{"command-line": line})
        return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()
