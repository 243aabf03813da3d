"""QEMU for its fixes: a bounded QMP load (query-status, query-block, a system_reset every
--reset-every rounds, which runs the IDE reset path) and one-shot QMP commands.

    python3 qmp_client.py --qmp /path/qmp.sock --seconds 6
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Any

__all__ = ["QMP", "load"]


class QMP:
    """A QMP connection (capabilities negotiated)."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP closed")
            m = json.loads(line)
            if "event" not in m:
                return dict(m)

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        """Returns QEMU's reply to one command."""
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        return self._read()

    def close(self) -> None:
        self.sock.close()


def load(path: str, seconds: float, reset_every: int = 50) -> dict[str, float]:
    """Returns counts of QMP commands answered and failed."""
    q = QMP(path)
    n = failed = resets = 0
    t0 = time.monotonic()
    end = t0 + min(seconds, 600)
    i = 0
    try:
        while time.monotonic() < end:
            i += 1
            cmds = ["query-status", "query-block"]
            if reset_every and i % reset_every == 0:
                cmds.append("system_reset")
                resets += 1
            for c in cmds:
                n += 1
                if "return" not in q.cmd(c):
                    failed += 1
    except (EOFError, OSError):
        failed += 1
    el = time.monotonic() - t0
    return {
        "requests": n,
        "ok": n - failed,
        "failed": failed,
        "resets": resets,
        "per_s": round(n / el, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qmp", required=True)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--reset-every", type=int, default=50)
    a = ap.parse_args()
    print(json.dumps(load(a.qmp, a.seconds, a.reset_every)), flush=True)


if __name__ == "__main__":
    main()
