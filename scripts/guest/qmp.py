"""A small QMP client: JSON lines over QEMU's ``-qmp unix:PATH,server=on,wait=off``."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["QMP", "QMPError"]


class QMPError(Exception):
    """QEMU answered a command with an error (the reply is in the message)."""


class QMP:
    """One QMP session: greeting and capabilities negotiated on connect; events are kept
    in :attr:`events`, not returned as answers."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read(answer=False)
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self, answer: bool = True) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if answer and "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Returns the command's ``return`` value; raises :class:`QMPError` on an error."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "return" not in reply:
            raise QMPError(f"{command}: {reply}")
        return reply["return"]

    def status(self) -> str:
        """Returns the VM's run state (``query-status``: ``running``, ``paused``, ...)."""
        return str(self.execute("query-status")["status"])

    def close(self) -> None:
        self.file.close()
        self.sock.close()
