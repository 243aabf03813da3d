"""memcached for its fixes: a bounded set+get load (pymemcache), a SASL PLAIN login loop
(binary protocol), raw text requests. Loopback only, every loop bounded in time.

    python3 mc_client.py load --port 11301 --seconds 6
    python3 mc_client.py sasl --port 11301 --user bob --password secret --seconds 6
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time

from pymemcache.client.base import Client

__all__ = ["load", "raw", "sasl_login", "sasl_load"]

_HDR = ">BBHBBHIIQ"


def load(port: int, seconds: float) -> dict[str, float]:
    """Returns counts of set+get pairs over one connection: right, wrong, errors."""
    c = Client(("127.0.0.1", port), connect_timeout=1, timeout=1)
    n = ok = failed = 0
    t0 = time.monotonic()
    end = t0 + min(seconds, 600)
    while time.monotonic() < end:
        n += 1
        k, v = f"k{n % 5000}", f"v{n}".encode()
        try:
            c.set(k, v, noreply=False)
            if c.get(k) == v:
                ok += 1
            else:
                failed += 1
        except Exception:
            failed += 1
            c.close()
            time.sleep(0.05)
    el = time.monotonic() - t0
    return {"requests": n, "ok": ok, "failed": failed, "per_s": round(n / el, 1)}


def raw(port: int, *requests: bytes, quiet: float = 0.5) -> list[bytes]:
    """Returns what came back for each request on one connection (a reply ends after
    ``quiet`` seconds without data; ``b"<closed>"`` is appended if the server closed)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        for req in requests:
            s.sendall(req)
            got = b""
            s.settimeout(quiet)
            try:
                while True:
                    b = s.recv(65536)
                    if not b:
                        got += b"<closed>"
                        break
                    got += b
            except TimeoutError:
                pass
            except ConnectionResetError:
                got += b"<closed>"
            out.append(got)
    return out


def sasl_login(port: int, user: str, password: str) -> int:
    """Returns the status of a SASL PLAIN authentication (0 ok, 0x20 auth error) after
    which a binary VERSION request must succeed."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        key, val = b"PLAIN", b"\0" + user.encode() + b"\0" + password.encode()
        s.sendall(struct.pack(_HDR, 0x80, 0x21, len(key), 0, 0, 0, len(key) + len(val), 0, 0))
        s.sendall(key + val)
        r = _recv(s, 24)
        status: int = struct.unpack(_HDR, r)[5]
        blen: int = struct.unpack(">I", r[8:12])[0]
        _recv(s, blen)
        s.sendall(struct.pack(_HDR, 0x80, 0x0B, 0, 0, 0, 0, 0, 0, 0))
        r = _recv(s, 24)
        _recv(s, struct.unpack(">I", r[8:12])[0])
        if struct.unpack(_HDR, r)[5] != 0:
            raise OSError("VERSION failed after the authentication")
        return status


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        b = s.recv(n - len(data))
        if not b:
            raise OSError("connection closed")
        data += b
    return data


def sasl_load(port: int, user: str, password: str, seconds: float) -> dict[str, float]:
    """Returns counts of SASL logins (a new connection each): ok, failed."""
    n = ok = 0
    t0 = time.monotonic()
    end = t0 + min(seconds, 600)
    while time.monotonic() < end:
        n += 1
        try:
            ok += sasl_login(port, user, password) == 0
        except OSError:
            time.sleep(0.05)
    el = time.monotonic() - t0
    return {"requests": n, "ok": ok, "failed": n - ok, "per_s": round(n / el, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["load", "sasl"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--user", default="bob")
    ap.add_argument("--password", default="secret")
    a = ap.parse_args()
    if a.what == "load":
        res = load(a.port, a.seconds)
    else:
        res = sasl_load(a.port, a.user, a.password, a.seconds)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
