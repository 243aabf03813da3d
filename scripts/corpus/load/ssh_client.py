"""sshd for its fixes: a bounded load of N parallel OpenSSH client loops (a new connection
each time, key authentication, ``echo ok``). Loopback only, bounded in time.

    python3 ssh_client.py --port 2201 --key RUN/client --seconds 6 [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time

__all__ = ["ssh_argv", "load"]


def ssh_argv(port: int, key: str, *command: str, agent: bool = False) -> list[str]:
    """Returns the ssh command line for root@127.0.0.1:port with key authentication."""
    return [
        "ssh",
        "-p",
        str(port),
        "-i",
        key,
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        *(["-A"] if agent else []),
        "root@127.0.0.1",
        *command,
    ]


def load(port: int, key: str, seconds: float, parallel: int = 2) -> dict[str, float]:
    """Returns counts of connections that printed ``ok`` and of the others."""
    cnt = {"requests": 0, "ok": 0, "failed": 0}
    lock = threading.Lock()
    end = time.monotonic() + min(seconds, 600)
    argv = ssh_argv(port, key, "echo ok")

    def loop() -> None:
        while time.monotonic() < end:
            try:
                r = subprocess.run(
                    argv, capture_output=True, timeout=15, stdin=subprocess.DEVNULL, check=False
                )
                good = r.returncode == 0 and r.stdout.strip() == b"ok"
            except subprocess.TimeoutExpired:
                good = False
            with lock:
                cnt["requests"] += 1
                cnt["ok" if good else "failed"] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**cnt, "per_s": round(cnt["requests"] / (time.monotonic() - t0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--parallel", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(load(a.port, a.key, a.seconds, a.parallel)), flush=True)


if __name__ == "__main__":
    main()
