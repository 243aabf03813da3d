"""DNS for the dnsmasq fixes: a bounded load loop, a fake upstream server with crafted
answers, one-shot queries (dnspython). Loopback only, every loop bounded in time.

    python3 dns_client.py load --port 5301 --seconds 6        # prints one JSON line
    python3 dns_client.py upstream --port 5399 --seconds 600  # the fake upstream
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

__all__ = ["load", "query", "upstream"]

LOCAL_NAME, LOCAL_ADDR = "test.local", "10.1.2.3"  # answered by dnsmasq itself (--address)
UPSTREAM_ADDR = "10.9.8.7"  # what the fake upstream answers to every A query


def query(port: int, name: str, rdtype: str = "A", timeout: float = 2.0) -> str:
    """Returns the answer as text: ``A 10.9.8.7``, ``rcode SERVFAIL``, or ``timeout``."""
    q = dns.message.make_query(name, rdtype)
    try:
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)
    except (dns.exception.Timeout, OSError):
        return "timeout"
    if r.rcode() != dns.rcode.NOERROR:
        return f"rcode {dns.rcode.to_text(r.rcode())}"
    items = [f"{dns.rdatatype.to_text(rr.rdtype)} {it}" for rr in r.answer for it in rr]
    return ", ".join(items) if items else "NOERROR, no answer"


def load(port: int, seconds: float) -> dict[str, float]:
    """Returns counts of A queries for names dnsmasq answers itself: right, wrong, lost."""
    sent = ok = bad = lost = 0
    t0 = time.monotonic()
    end = t0 + min(seconds, 600)
    while time.monotonic() < end:
        q = dns.message.make_query(f"q{sent}.{LOCAL_NAME}", "A")
        sent += 1
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=1.0)
            addrs = [it.address for rr in r.answer for it in rr]
            if addrs == [LOCAL_ADDR]:
                ok += 1
            else:
                bad += 1
        except (dns.exception.Timeout, OSError):
            lost += 1
    el = time.monotonic() - t0
    return {"requests": sent, "ok": ok, "failed": bad + lost, "per_s": round(sent / el, 1)}


def _mx_rdlen_lie(q_wire: bytes, q: dns.message.Message) -> bytes:
    """An MX answer whose rdlen (3) is shorter than its exchange name (CVE-2026-5172)."""
    qid = struct.unpack(">H", q_wire[:2])[0]
    out = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    name = q.question[0].name.to_wire()
    assert name is not None  # bytes: to_wire() without a file returns them
    out += name + struct.pack(">HH", 15, 1)
    label = b"\x3f" + b"m" * 63 + b"\x00"
    return out + b"\xc0\x0c" + struct.pack(">HHIH", 15, 1, 60, 3) + b"\x00\x0a" + label


def upstream(port: int, seconds: float) -> None:
    """Serves UDP on 127.0.0.1:port for ``seconds``: every A query gets 10.9.8.7 with the
    query's EDNS options echoed (an ECS option added by --add-subnet comes back), except
    ``ecsbad*`` (an ECS option for another subnet: CVE-2026-4893) and ``mxlie*`` MX
    (CVE-2026-5172)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.settimeout(0.5)
    end = time.monotonic() + min(seconds, 7200)
    while time.monotonic() < end:
        try:
            data, peer = s.recvfrom(4096)
            q = dns.message.from_wire(data)
        except (TimeoutError, dns.exception.DNSException):
            continue
        qn = q.question[0].name.to_text().lower()
        qt = q.question[0].rdtype
        if qn.startswith("mxlie") and qt == 15:
            s.sendto(_mx_rdlen_lie(data, q), peer)
            continue
        r = dns.message.make_response(q)
        if qt == 1:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", UPSTREAM_ADDR))
        if q.edns >= 0:
            opts = list(q.options)
            if qn.startswith("ecsbad"):
                opts = [dns.edns.ECSOption("10.0.0.0", 24, 24)]
            r.use_edns(0, 0, 1232, options=opts)
        s.sendto(r.to_wire(), peer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["load", "upstream"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=6)
    a = ap.parse_args()
    if a.what == "load":
        print(json.dumps(load(a.port, a.seconds)), flush=True)
    else:
        upstream(a.port, a.seconds)


if __name__ == "__main__":
    main()
