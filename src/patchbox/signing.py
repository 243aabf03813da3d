"""Signed patches: Ed25519 keys, signing a patch file, and the trust check of `apply`.

Keys (``patchbox keygen --out DIR/NAME``): ``NAME.key`` (PKCS#8 PEM, mode 0600) and
``NAME.pub`` (SubjectPublicKeyInfo PEM). A key's id is the SHA-256 of its raw 32-byte
public key; a signed patch file carries it in its trailer (docs/patch-format.md).

Trust: ``--trust-dir`` of `apply`, else ``$PATCHBOX_TRUST_DIR``, else
:data:`DEFAULT_TRUST_DIR`. When that directory exists, `apply` and `install` (and the
Ansible modules) accept only patches signed by one of its ``*.pub`` keys; when the
default directory does not exist, unsigned patches are accepted (a directory named
explicitly must exist). This is a policy of the client: the agent never sees a
signature (docs/decisions.md, "Trust (issue 18): client side").

The directory, every directory above it and every key must be owned by root or this
user and writable by nobody else, and no link is followed on the way or to a key
(:mod:`patchbox.safefs`): otherwise whoever could change them would choose what is
trusted. Anything else is refused with the path, its owner and mode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from patchbox import safefs
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
    "parse_public_key",
    "trusted_keys",
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
    """Writes ``OUT.key`` and ``OUT.pub``; returns (key path, pub path, key id).

    Both are created new (``O_CREAT | O_EXCL | O_NOFOLLOW``): an existing file, or a link
    planted at either name, is refused, never written through."""
    base = Path(out)
    key_path, pub_path = Path(f"{base}.key"), Path(f"{base}.pub")
    for path in (key_path, pub_path):
        if os.path.lexists(path):
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
        for path, data, mode in ((key_path, pem, 0o600), (pub_path, pub, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # whatever the umask
                f.write(data)
    except FileExistsError as err:
        raise KeyError_(f"{err.filename} exists: not overwriting a key") from err
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


def _read_nofollow(dirfd: int, name: str, shown: Path) -> bytes:
    """Returns the bytes of trusted key ``name`` in the trust directory ``dirfd``: opened
    without following a link, and refused unless it is a regular file owned by root (or
    this user) and writable by nobody else."""
    try:
        fd = safefs.open_nofollow(dirfd, name)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TrustError(
                f"trusted key {shown} is a symbolic link: not followed (whoever can change "
                f"the link chooses the key); copy the key itself into the trust directory"
            ) from err
        raise KeyError_(f"cannot read trusted key {shown}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TrustError(f"trusted key {shown} is not a regular file ({safefs.describe(st)})")
        why = safefs.unsafe_reason(st, safefs.trusted_owners())
        if why:
            raise TrustError(
                f"trusted key {shown} {why}: whoever can change it chooses which patches are "
                f"trusted; make it root's and not writable by others (chown root; chmod 644)"
            )
        return f.read(1 << 16)


def parse_public_key(data: bytes, path: Path) -> Ed25519PublicKey:
    """Returns the Ed25519 public key of PEM bytes ``data`` read from ``path``."""
    try:
        key = serialization.load_pem_public_key(data)
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


def _open_trust_dir(trust: Trust) -> int | None:
    """Returns a descriptor of the trust directory, None when it does not exist (an
    error if it was named explicitly). Raises TrustError unless it and every directory
    above it are real directories owned by root (or this user) and writable by nobody
    else (a root-owned sticky directory above it passes)."""
    where = trust.path
    try:
        fd = safefs.walk(where, owners=safefs.trusted_owners(), missing_ok=True)
    except safefs.UnsafePathError as err:
        raise TrustError(
            f"trust directory {where}: {err}: whoever can change it chooses which patches "
            f"are trusted; it and every directory above it must be owned by root (or this "
            f"user) and writable by nobody else"
        ) from err
    except NotADirectoryError as err:
        raise TrustError(f"trust directory {where} is not a directory") from err
    except OSError as err:
        raise TrustError(f"cannot open trust directory {where}: {err.strerror}") from err
    if fd is None and trust.explicit:
        raise TrustError(
            f"trust directory {where} does not exist (--trust-dir / PATCHBOX_TRUST_DIR): "
            f"a typo must not switch the signature check off"
        )
    return fd


def trusted_keys(trust: Trust) -> dict[bytes, tuple[Path, Ed25519PublicKey]] | None:
    """Returns {key id: (file, key)} of the ``*.pub`` files of the trust directory, None
    when the default directory does not exist (no check). Every file and directory is
    checked as :func:`_open_trust_dir` and :func:`_read_nofollow` say; a ``*.pub`` that
    is not an Ed25519 PEM public key fails closed."""
    fd = _open_trust_dir(trust)
    if fd is None:
        return None
    keys: dict[bytes, tuple[Path, Ed25519PublicKey]] = {}
    try:
        # As glob("*.pub"): names starting with a dot are not keys.
        for name in sorted(n for n in os.listdir(fd) if n.endswith(".pub") and n[0] != "."):
            path = trust.path / name
            public = parse_public_key(_read_nofollow(fd, name, path), path)
            keys[key_id(public)] = (path, public)
    finally:
        os.close(fd)
    return keys


def check_trust(data: bytes, file: str, trust: Trust) -> str:
    """Raises TrustError unless patch-file bytes ``data`` may be applied under ``trust``.

    Returns a short description of the outcome (for messages): which key signed it, or
    that no trust directory is configured. This is the client's policy (`apply`,
    `install`, the Ansible modules); the agent's rule is the kernel's ptrace rule
    (docs/decisions.md, "Trust (issue 18): client side").
    """
    sig = split_signature(data)
    where = trust.path
    keys = trusted_keys(trust)
    if keys is None:
        return "unchecked: no trust directory " + str(where)
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
    path, public = keys[sig.key_id]
    try:
        public.verify(sig.signature, sig.signed)
    except InvalidSignature as err:
        raise TrustError(
            f"{file}: signature by key {want} ({path}) does not verify: "
            "the file was changed after signing"
        ) from err
    return f"signed by trusted key {want[:16]} ({path.name})"
