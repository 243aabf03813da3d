"""Signed patches: Ed25519 keys, signing a patch file, and the trust check of `apply`.

Keys (``patchbox keygen --out DIR/NAME``): ``NAME.key`` (PKCS#8 PEM, mode 0600) and
``NAME.pub`` (SubjectPublicKeyInfo PEM). A key's id is the SHA-256 of its raw 32-byte
public key; a signed patch file carries it in its trailer (docs/patch-format.md).

Trust: ``--trust-dir`` of `apply`, else ``$PATCHBOX_TRUST_DIR``, else
:data:`DEFAULT_TRUST_DIR`. When that directory exists, `apply` accepts only patches
signed by one of its ``*.pub`` keys; when the default directory does not exist,
unsigned patches are accepted (a directory named explicitly must exist).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from patchbox.errors import PatchboxError
from patchbox.format.layout import split_signature, with_signature

__all__ = [
    "DEFAULT_TRUST_DIR",
    "TrustError",
    "KeyError_",
    "Trust",
    "key_id",
    "keygen",
    "load_private_key",
    "sign_file_bytes",
    "trust_dir",
    "check_trust",
]

DEFAULT_TRUST_DIR = Path("/etc/patchbox/trusted-keys")


class TrustError(PatchboxError):
    """A patch is unsigned, signed by an untrusted key, or its signature does not verify."""


class KeyError_(PatchboxError):
    """A key file cannot be written, read or is not an Ed25519 key."""


def key_id(public: Ed25519PublicKey) -> bytes:
    """Returns the 32-byte id of a public key: sha256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()


def keygen(out: str | os.PathLike[str]) -> tuple[Path, Path, bytes]:
    """Writes ``OUT.key`` and ``OUT.pub``; returns (key path, pub path, key id)."""
    base = Path(out)
    key_path, pub_path = Path(f"{base}.key"), Path(f"{base}.pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyError_(f"{path} exists: not overwriting a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub_path.write_bytes(pub)
    except OSError as err:
        raise KeyError_(f"cannot write key {base}: {err.strerror}") from err
    return key_path, pub_path, key_id(private.public_key())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Returns the Ed25519 private key stored at ``path`` (PEM, unencrypted)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise KeyError_(f"cannot read private key {path}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyError_(f"{path} is not an unencrypted PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Returns the Ed25519 public key stored at ``path`` (PEM)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise KeyError_(f"cannot read trusted key {path}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise KeyError_(f"trusted key {path} is not a PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_(f"trusted key {path} is not an Ed25519 public key")
    return key


def sign_file_bytes(data: bytes, private: Ed25519PrivateKey) -> bytes:
    """Returns patch-file bytes ``data`` signed with ``private`` (an old signature is replaced)."""
    return with_signature(data, key_id(private.public_key()), private.sign)


@dataclass(frozen=True)
class Trust:
    """Where trusted keys are looked for and whether that directory must exist."""

    path: Path
    explicit: bool  # named by --trust-dir or $PATCHBOX_TRUST_DIR


def trust_dir(option: str | None = None) -> Trust:
    """Returns the trust directory: ``option``, else $PATCHBOX_TRUST_DIR, else the default."""
    if option:
        return Trust(Path(option), True)
    env = os.environ.get("PATCHBOX_TRUST_DIR")
    if env:
        return Trust(Path(env), True)
    return Trust(DEFAULT_TRUST_DIR, False)


def check_trust(data: bytes, file: str, trust: Trust) -> str:
    """Raises TrustError unless patch-file bytes ``data`` may be applied under ``trust``.

    Returns a short description of the outcome (for messages): which key signed it, or
    that no trust directory is configured.
    """
    sig = split_signature(data)
    where = trust.path
    if not where.is_dir():
        if trust.explicit:
            raise TrustError(
                f"trust directory {where} does not exist (--trust-dir / PATCHBOX_TRUST_DIR)"
            )
        return "unchecked: no trust directory " + str(where)
    keys: dict[bytes, Path] = {}
    for path in sorted(where.glob("*.pub")):
        keys[key_id(load_public_key(path))] = path
    if sig is None:
        raise TrustError(
            f"{file} is not signed, and {where} ({len(keys)} trusted keys) requires a "
            f"signature by one of them: sign it with `patchbox sign --key KEY.key {file}`"
        )
    want = sig.key_id.hex()
    if sig.key_id not in keys:
        raise TrustError(
            f"{file} is signed by key {want}, which is not trusted: no *.pub in {where} "
            f"has that id ({len(keys)} keys there); add that key's .pub to trust it"
        )
    public = load_public_key(keys[sig.key_id])
    try:
        public.verify(sig.signature, sig.signed)
    except InvalidSignature as err:
        raise TrustError(
            f"{file}: signature by key {want} ({keys[sig.key_id]}) does not verify: "
            "the file was changed after signing"
        ) from err
    return f"signed by trusted key {want[:16]} ({keys[sig.key_id].name})"
