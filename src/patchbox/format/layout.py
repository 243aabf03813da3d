"""The patch file and apply-body byte layouts (docs/patch-format.md, docs/protocol.md).

Returns and accepts :class:`patchbox.format.model.Patch`; all structure is declared
here, all validation that a reader must do happens in :func:`decode_apply_body`.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchbox import wire as C
from patchbox.errors import PatchFormatError
from patchbox.format.codec import Reader, Writer
from patchbox.format.model import Fixup, Function, Hook, Patch
from patchbox.wire import FixupBase, FixupSection, FixupType, HookKind, RedirectKind

__all__ = [
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "HEADER",
    "APPLY_BODY",
    "FUNCTION_RECORD",
    "FIXUP_RECORD",
    "HOOK_RECORD",
    "Field",
    "wire_names",
    "encode_apply_body",
    "decode_apply_body",
    "check_name",
    "write_patch",
    "read_patch",
    "save_patch",
    "load_patch",
    "PatchFile",
    "read_patch_file",
    "split_patch_file",
    "FLAG_SIGNED",
    "SIG_TRAILER",
    "SIG_MAGIC",
    "SIG_ED25519",
    "Signature",
    "split_signature",
    "with_signature",
]

FILE_MAGIC = b"PBXPATCH"
FORMAT_VERSION = 1
# magic, format version, header size, flags, payload length, sha256
HEADER = struct.Struct("<8sHHIQ32s")
NAME_RE = re.compile(rf"^[A-Za-z0-9._+-]{{1,{C.MAX_NAME}}}$")
FIXUP_SIZE = {FixupType.PC32: 4, FixupType.ABS64: 8}
# Header flags: bit 0 = a signature trailer follows the payload (docs/patch-format.md).
FLAG_SIGNED = 0x1
# Signature trailer: magic, algorithm, key id (sha256 of the raw public key), signature
# over header + payload.
SIG_TRAILER = struct.Struct("<8sB32s64s")
SIG_MAGIC = b"PBXSIG01"
SIG_ED25519 = 1


# -- the apply body, declared once ---------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One field of the apply body (docs/protocol.md "APPLY").

    ``kind``: ``u8``/``u16``/``u32``/``u64``/``i64``; ``str`` (u16 length + UTF-8);
    ``blob`` (u32 length + bytes); ``bytes8``/``bytes16`` (u8/u16 length + bytes, the
    length named ``<name>_len``); ``list16``/``list32`` (u16/u32 count named ``count``,
    then that many ``record`` entries, each field prefixed ``item`` in the agent's messages).
    ``lo``/``hi`` bound a length or count; ``when`` names the field (of the same record)
    and the value it must have for this field to be present.
    """

    name: str
    kind: str
    lo: int = 0
    hi: int | None = None
    record: tuple[Field, ...] = ()
    count: str = ""
    item: str = ""
    when: tuple[str, int] | None = None


FUNCTION_RECORD = (
    Field("symbol", "str"),
    Field("target", "u64"),
    Field("new_offset", "u32"),
    Field("new_size", "u32"),
    Field("kind", "u8"),
    Field("skip", "u8"),
    Field("expected", "bytes16", C.MIN_EXPECTED, C.MAX_EXPECTED),
)
FIXUP_RECORD = (
    Field("section", "u8"),
    Field("type", "u8"),
    Field("base", "u8"),
    Field("reserved", "u8"),
    Field("offset", "u32"),
    Field("addend", "i64"),
    Field("symbol", "str", when=("base", FixupBase.IMPORT)),
)
HOOK_RECORD = (
    Field("when", "u8"),
    Field("offset", "u32"),
)
APPLY_BODY = (
    Field("name", "str"),
    Field("build_id", "bytes8", 1, C.MAX_BUILD_ID),
    Field("flags", "u32"),
    Field("text", "blob"),
    Field("data", "blob"),
    Field("bss_size", "u32"),
    Field("functions", "list16", 1, C.MAX_FUNCS, FUNCTION_RECORD, "nfuncs", "function"),
    Field("fixups", "list32", 0, C.MAX_FIXUPS, FIXUP_RECORD, "nfixups", "fixup"),
    Field("hooks", "list16", 0, C.MAX_HOOKS, HOOK_RECORD, "nhooks", "hook"),
)
_INTS = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "i64": 8}
_LENGTH = {"bytes8": "u8", "bytes16": "u16", "list16": "u16", "list32": "u32"}


def wire_names(fields: tuple[Field, ...] = APPLY_BODY, item: str = "") -> list[str]:
    """Returns the names of the body's fields in wire order, as the agent's parser names
    them in its messages (``build_id_len``, ``function target``...)."""
    out: list[str] = []
    prefix = f"{item} " if item else ""
    for f in fields:
        if f.kind in ("bytes8", "bytes16"):
            out += [f"{prefix}{f.name}_len", f"{prefix}{f.name}"]
        elif f.kind in ("list16", "list32"):
            out.append(f"{prefix}{f.count}")
            out += wire_names(f.record, f.item)
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _write(w: Writer, fields: tuple[Field, ...], value: object) -> None:
    for f in fields:
        if f.when is not None and getattr(value, f.when[0]) != f.when[1]:
            continue
        v: Any = getattr(value, f.name, 0)  # `reserved` is not in the model: always 0
        if f.kind in _INTS:
            getattr(w, f.kind)(int(v))
        elif f.kind == "str":
            w.str(v)
        elif f.kind == "blob":
            w.blob(v)
        elif f.kind in _LENGTH:
            getattr(w, _LENGTH[f.kind])(len(v))
            if f.kind.startswith("list"):
                for item in v:
                    _write(w, f.record, item)
            else:
                w.raw(v)


def _read(r: Reader, fields: tuple[Field, ...], where: str = "") -> dict[str, Any]:
    """Returns the fields read as a dict; lists as lists of dicts. Lengths and counts
    outside their ``lo``..``hi`` raise PatchFormatError before anything is read."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.when is not None and out.get(f.when[0]) != f.when[1]:
            continue
        label = f"{where}{f.name}"
        if f.kind in _INTS:
            out[f.name] = getattr(r, f.kind)(label)
        elif f.kind == "str":
            out[f.name] = r.str(label)
        elif f.kind == "blob":
            out[f.name] = r.blob(label)
        else:
            n = getattr(r, _LENGTH[f.kind])(f"{label} {'count' if f.record else 'length'}")
            if not f.lo <= n <= (f.hi if f.hi is not None else n):
                what = f"{n} {f.name}" if f.record else f"{label} length {n}"
                raise PatchFormatError(f"patch body: {what} out of range ({f.lo}..{f.hi} allowed)")
            if f.record:
                out[f.name] = [_read(r, f.record, f"{f.item}[{i}].") for i in range(n)]
            else:
                out[f.name] = r.raw(n, label)
    return out


def encode_apply_body(patch: Patch) -> bytes:
    """Returns the APPLY request payload for ``patch`` (also the file's body)."""
    check_name(patch.name)
    w = Writer()
    _write(w, APPLY_BODY, patch)
    return bytes(w)


def check_name(name: str) -> None:
    """Raises PatchFormatError unless ``name`` is a valid patch name."""
    if not NAME_RE.match(name):
        raise PatchFormatError(
            f"invalid patch name {name!r}: 1..{C.MAX_NAME} characters of A-Z a-z 0-9 . _ + -"
        )


def decode_apply_body(body: bytes, meta: dict[str, str] | None = None) -> Patch:
    """Returns the Patch encoded in an apply body; raises PatchFormatError if invalid."""
    r = Reader(body, PatchFormatError, "patch body")
    raw = _read(r, APPLY_BODY)
    r.end()
    check_name(raw["name"])
    text, data = raw["text"], raw["data"]
    functions = []
    for fn in raw["functions"]:
        symbol = fn["symbol"]
        try:
            kind = RedirectKind(fn["kind"])
        except ValueError as err:
            raise PatchFormatError(
                f"patch body: {symbol}: unknown redirect kind {fn['kind']}"
            ) from err
        skip = fn["skip"]
        if skip not in ((0, C.ENDBR_SKIP) if kind == RedirectKind.ENTRY_JUMP else (0,)):
            raise PatchFormatError(f"patch body: {symbol}: skip {skip} invalid for {kind.name}")
        # Any offset: a replacement without its own 6+2 NOPs is valid, only not stackable on.
        if fn["new_offset"] >= len(text) or fn["new_offset"] + fn["new_size"] > len(text):
            raise PatchFormatError(
                f"patch body: {symbol}: replacement [{fn['new_offset']}, +{fn['new_size']}) "
                f"outside the {len(text)}-byte text"
            )
        functions.append(
            Function(
                symbol, fn["target"], fn["new_offset"], fn["new_size"], fn["expected"], kind, skip
            )
        )
    fixups = []
    for i, fx in enumerate(raw["fixups"]):
        try:
            section = FixupSection(fx["section"])
            ftype = FixupType(fx["type"])
            base = FixupBase(fx["base"])
        except ValueError as err:
            raise PatchFormatError(f"patch body: fixup[{i}]: {err}") from err
        limit = len(text) if section == FixupSection.TEXT else len(data)
        if fx["offset"] + FIXUP_SIZE[ftype] > limit:
            raise PatchFormatError(
                f"patch body: fixup[{i}] at {section.name.lower()}+{fx['offset']:#x} outside "
                f"the {limit}-byte {section.name.lower()}"
            )
        fixups.append(Fixup(section, ftype, base, fx["offset"], fx["addend"], fx.get("symbol", "")))
    hooks = []
    for i, hk in enumerate(raw["hooks"]):
        try:
            when = HookKind(hk["when"])
        except ValueError as err:
            raise PatchFormatError(f"patch body: hook[{i}]: {err}") from err
        if hk["offset"] >= len(text):
            raise PatchFormatError(
                f"patch body: hook[{i}] at text+{hk['offset']:#x} outside the {len(text)}-byte text"
            )
        hooks.append(Hook(when, hk["offset"]))
    return Patch(
        name=raw["name"],
        build_id=raw["build_id"],
        text=text,
        functions=functions,
        fixups=fixups,
        data=data,
        bss_size=raw["bss_size"],
        flags=raw["flags"],
        meta=dict(meta or {}),
        hooks=hooks,
    )


def write_patch(patch: Patch) -> bytes:
    """Returns the bytes of an (unsigned) patch file for ``patch``."""
    payload = bytes(Writer().kv(patch.meta)) + encode_apply_body(patch)
    header = HEADER.pack(
        FILE_MAGIC, FORMAT_VERSION, HEADER.size, 0, len(payload), hashlib.sha256(payload).digest()
    )
    return header + payload


def split_patch_file(data: bytes) -> tuple[dict[str, str], bytes]:
    """Returns (meta, apply body) of a patch file after checking header, hash and, for a
    signed file, the layout of its signature trailer (not the signature: see
    :mod:`patchbox.signing`)."""
    if len(data) < HEADER.size:
        raise PatchFormatError(
            f"not a patchbox patch file: {len(data)} bytes, shorter than the "
            f"{HEADER.size}-byte header"
        )
    magic, version, hsize, flags, length, digest = HEADER.unpack_from(data)
    if magic != FILE_MAGIC:
        raise PatchFormatError("not a patchbox patch file (bad magic)")
    if version != FORMAT_VERSION:
        raise PatchFormatError(
            f"unsupported patch format version {version} (this reads {FORMAT_VERSION})"
        )
    if hsize != HEADER.size:
        raise PatchFormatError(f"bad header size {hsize}")
    if flags & ~FLAG_SIGNED:
        raise PatchFormatError(f"unknown header flags {flags:#x} (this reads {FLAG_SIGNED:#x})")
    trailer = SIG_TRAILER.size if flags & FLAG_SIGNED else 0
    payload = data[HEADER.size : len(data) - trailer]
    if len(data) - HEADER.size - trailer != length:
        extra = f" and the {trailer}-byte signature" if trailer else ""
        raise PatchFormatError(
            f"patch file truncated or padded: header says {length} payload bytes{extra}, "
            f"file has {len(data) - HEADER.size} after the header"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise PatchFormatError("integrity hash mismatch: patch file is corrupt")
    if trailer:
        sig_magic, alg, _key_id, _sig = SIG_TRAILER.unpack_from(data, len(data) - trailer)
        if sig_magic != SIG_MAGIC:
            raise PatchFormatError("signed patch file without a signature trailer (bad magic)")
        if alg != SIG_ED25519:
            raise PatchFormatError(
                f"unknown signature algorithm {alg} (this reads {SIG_ED25519} = Ed25519)"
            )
    r = Reader(payload, PatchFormatError, "patch file")
    meta = r.kv("meta")
    return meta, payload[r.pos :]


def read_patch(data: bytes) -> Patch:
    """Returns the Patch in patch-file bytes (signed or not); raises PatchFormatError if
    invalid. The signature itself is checked by :func:`patchbox.signing.check_trust`."""
    meta, body = split_patch_file(data)
    return decode_apply_body(body, meta)


def save_patch(patch: Patch, path: str | Path) -> None:
    """Writes ``patch`` to ``path``."""
    Path(path).write_bytes(write_patch(patch))


@dataclass(frozen=True)
class PatchFile:
    """A patch file read once: the bytes that are hashed and signed, the apply body that is
    sent unchanged, and the Patch they encode."""

    path: str
    data: bytes
    body: bytes
    patch: Patch


def read_patch_file(path: str | Path) -> PatchFile:
    """Returns the patch file at ``path`` (header, hash and layout checked, not the
    signature: :func:`patchbox.signing.check_trust`); raises PatchFormatError naming the
    file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PatchFormatError(f"cannot read patch file {path}: {err.strerror}") from err
    try:
        meta, body = split_patch_file(data)
        patch = decode_apply_body(body, meta)
    except PatchFormatError as err:
        raise PatchFormatError(f"{path}: {err}") from err
    return PatchFile(str(path), data, body, patch)


def load_patch(path: str | Path) -> Patch:
    """Returns the Patch stored at ``path``."""
    return read_patch_file(path).patch


@dataclass(frozen=True)
class Signature:
    """The signature trailer of a signed patch file."""

    alg: int
    key_id: bytes  # sha256 of the signer's raw 32-byte public key
    signature: bytes
    signed: bytes  # the bytes it covers: header + payload


def split_signature(data: bytes) -> Signature | None:
    """Returns the signature trailer of valid patch-file bytes, None if unsigned.
    Raises PatchFormatError if the file is invalid (see split_patch_file)."""
    split_patch_file(data)
    if not HEADER.unpack_from(data)[3] & FLAG_SIGNED:
        return None
    _magic, alg, key_id, sig = SIG_TRAILER.unpack_from(data, len(data) - SIG_TRAILER.size)
    return Signature(alg, key_id, sig, data[: len(data) - SIG_TRAILER.size])


def with_signature(data: bytes, key_id: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """Returns patch-file bytes ``data`` (signed or not) signed anew: header flag bit 0
    set, then the trailer with ``key_id`` and ``sign(header + payload)`` (64 bytes)."""
    split_patch_file(data)
    magic, version, hsize, flags, length, digest = HEADER.unpack_from(data)
    header = HEADER.pack(magic, version, hsize, flags | FLAG_SIGNED, length, digest)
    signed = header + data[HEADER.size : HEADER.size + length]
    signature = sign(signed)
    if len(key_id) != 32 or len(signature) != 64:
        raise ValueError("key id must be 32 bytes and the signature 64")
    return signed + SIG_TRAILER.pack(SIG_MAGIC, SIG_ED25519, key_id, signature)
