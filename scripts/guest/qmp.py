"""A small QMP client: JSON lines over QEMU's ``-qmp unix:PATH,server=on,wait=off``."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["QMP", "QMPError"]


class QMPError(Exception):
    """QEMU answered a command with an error (the reply is in the message)."""


class QMP:
    """One QMP session: greeting and capabilities negotiated on connect; events are kept
    in :attr:`events` (with the host's time they were read, ``time.monotonic()``, in
    :attr:`event_times`), not returned as answers."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray()
        self.events: list[dict[str, Any]] = []
        self.event_times: list[float] = []
        greeting = self._read_message(time.monotonic() + timeout)
        if greeting is None or "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        """Returns the next message, None once ``deadline`` (``time.monotonic()``) passed."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """Returns the next answer (keeping events), None once ``deadline`` passed."""
        while True:
            msg = self._read_message(deadline)
            if msg is None or "event" not in msg:
                return msg
            self.events.append(msg)
            self.event_times.append(time.monotonic())

    def execute(self, command: str, **arguments: Any) -> Any:
        """Returns the command's ``return`` value; raises :class:`QMPError` on an error,
        TimeoutError without an answer within the session's timeout."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read(time.monotonic() + self.timeout)
        if reply is None:
            raise TimeoutError(f"QMP {command}: no answer in {self.timeout:g} s")
        if "return" not in reply:
            raise QMPError(f"{command}: {reply}")
        return reply["return"]

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, *, start: int = 0
    ) -> tuple[dict[str, Any], float] | None:
        """Returns the first event from index ``start`` of :attr:`events` on for which
        ``match`` holds, with the host's time it was read, reading more as they come;
        None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.events):
                if match(self.events[i]):
                    return self.events[i], self.event_times[i]
                i += 1
            msg = self._read_message(deadline)
            if msg is None:
                return None
            if "event" not in msg:
                raise QMPError(f"an answer while no command was sent: {msg}")
            self.events.append(msg)
            self.event_times.append(time.monotonic())

    def status(self) -> str:
        """Returns the VM's run state (``query-status``: ``running``, ``paused``, ...)."""
        return str(self.execute("query-status")["status"])

    def close(self) -> None:
        self.sock.close()
