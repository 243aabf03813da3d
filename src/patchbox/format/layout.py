"""The patch file and apply-body byte layouts (docs/patch-format.md, docs/protocol.md).

Returns and accepts :class:`patchbox.format.model.Patch`. Every layout is declared once,
in wire/constants.toml, and generated into :mod:`patchbox.wire` (the file header and
signature trailer as struct formats, the apply body as :class:`~patchbox.wire.Field`
tuples) and into the agent's ``wire.h``; the encoder and decoder here follow them, and
all validation that a reader must do happens in :func:`decode_apply_body`.
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
from patchbox.arch import ABSENT_MACHINE, Machine, get_arch_by_machine
from patchbox.errors import PatchFormatError
from patchbox.format.codec import Reader, Writer, read_fields, write_fields
from patchbox.format.model import Fixup, Function, Hook, Patch
from patchbox.wire import (
    APPLY_BODY,
    FIXUP_RECORD,
    FUNCTION_RECORD,
    HOOK_RECORD,
    Field,
    FixupBase,
    FixupSection,
    FixupType,
    HookKind,
    RedirectKind,
)

__all__ = [
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "HEADER",
    "APPLY_BODY",
    "FUNCTION_RECORD",
    "FIXUP_RECORD",
    "HOOK_RECORD",
    "Field",
    "record_widths",
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

FILE_MAGIC = C.FILE_MAGIC
FORMAT_VERSION = C.FILE_FORMAT_VERSION
# magic, format version, header size, flags, payload length, sha256 (C.FILE_HEADER_FIELDS)
HEADER = struct.Struct(C.FILE_HEADER_FORMAT)
NAME_RE = re.compile(rf"^[A-Za-z0-9._+-]{{1,{C.MAX_NAME}}}$")
# Header flags: bit 0 = a signature trailer follows the payload (docs/patch-format.md).
FLAG_SIGNED = C.FILE_FLAG_SIGNED
# Signature trailer: magic, algorithm, key id (sha256 of the raw public key), signature
# over header + payload (C.SIG_TRAILER_FIELDS).
SIG_TRAILER = struct.Struct(C.SIG_TRAILER_FORMAT)
SIG_MAGIC = C.FILE_SIG_MAGIC
SIG_ED25519 = C.FILE_SIG_ED25519


def record_widths(fmt: str, names: tuple[str, ...]) -> dict[str, int]:
    """Returns {field: bytes} of a fixed record given its struct format and field names."""
    codes = re.findall(r"\d*[A-Za-z]", fmt.lstrip("<"))
    return {n: struct.calcsize("<" + c) for n, c in zip(names, codes, strict=True)}


SIG_WIDTHS = record_widths(C.SIG_TRAILER_FORMAT, C.SIG_TRAILER_FIELDS)


def _header(data: bytes) -> dict[str, Any]:
    """Returns the file header at the start of ``data`` by field name."""
    return dict(zip(C.FILE_HEADER_FIELDS, HEADER.unpack_from(data), strict=True))


def _trailer(data: bytes) -> dict[str, Any]:
    """Returns the signature trailer at the end of ``data`` by field name."""
    fields = SIG_TRAILER.unpack_from(data, len(data) - SIG_TRAILER.size)
    return dict(zip(C.SIG_TRAILER_FIELDS, fields, strict=True))


def _pack_header(**fields: Any) -> bytes:
    """Returns the file header of ``fields`` (every name of C.FILE_HEADER_FIELDS)."""
    return HEADER.pack(*(fields[name] for name in C.FILE_HEADER_FIELDS))


# -- the apply body: APPLY_BODY (patchbox.wire, from wire/constants.toml) -----------------


def encode_apply_body(patch: Patch) -> bytes:
    """Returns the APPLY request payload for ``patch`` (also the file's body)."""
    check_name(patch.name)
    w = Writer()
    write_fields(w, APPLY_BODY if patch.machine != ABSENT_MACHINE else _BODY_BEFORE_MACHINE, patch)
    return bytes(w)


# A patch for ABSENT_MACHINE (the machine every body written before the field existed is
# for) is written without it, byte for byte as before: an agent linked before the field
# existed (a process started before an upgrade of patchbox) reads the body to its end and
# refuses trailing bytes, so writing the field for it would lock every running process
# out of new patches. Other machines always carry it (no older agent exists for them).
_BODY_BEFORE_MACHINE = tuple(f for f in APPLY_BODY if not f.optional)


def check_name(name: str) -> None:
    """Raises PatchFormatError unless ``name`` is a valid patch name."""
    if not NAME_RE.match(name):
        raise PatchFormatError(
            f"invalid patch name {name!r}: 1..{C.MAX_NAME} characters of A-Z a-z 0-9 . _ + -"
        )


def decode_apply_body(body: bytes, meta: dict[str, str] | None = None) -> Patch:
    """Returns the Patch encoded in an apply body; raises PatchFormatError if invalid."""
    r = Reader(body, PatchFormatError, "patch body")
    raw = read_fields(r, APPLY_BODY)
    r.end()
    check_name(raw["name"])
    try:  # absent: written before the field existed (docs/patch-format.md)
        machine = Machine(raw.get("machine", ABSENT_MACHINE))
    except ValueError as err:
        raise PatchFormatError(
            f"patch body: machine {raw['machine']} is no architecture patchbox knows "
            f"({', '.join(f'{m.value} {m.name.lower()}' for m in Machine)})"
        ) from err
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
        if skip not in _skips(machine, kind):
            raise PatchFormatError(
                f"patch body: {symbol}: skip {skip} invalid for {kind.name} on "
                f"{machine.name.lower()}"
            )
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
        if ftype not in get_arch_by_machine(int(machine)).fixup_types:
            raise PatchFormatError(
                f"patch body: fixup[{i}]: type {ftype.name} is not a fix-up type of "
                f"{machine.name.lower()}"
            )
        limit = len(text) if section == FixupSection.TEXT else len(data)
        if fx["offset"] + C.FIXUP_WIDTH[ftype] > limit:
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
        machine=machine,
    )


def _skips(machine: Machine, kind: RedirectKind) -> tuple[int, ...]:
    """Returns the skip values a function record of ``kind`` may carry on ``machine``: 0, or
    past the architecture's landing pad kept at the entry, before an entry jump, and
    before a patchable entry where the compiler puts the pad at the symbol
    (docs/redirect.md)."""
    entry = get_arch_by_machine(machine).entry
    if entry.landing and (kind == RedirectKind.ENTRY_JUMP or entry.landing_in_entry):
        return (0, entry.skip)
    return (0,)


def write_patch(patch: Patch) -> bytes:
    """Returns the bytes of an (unsigned) patch file for ``patch``."""
    payload = bytes(Writer().kv(patch.meta)) + encode_apply_body(patch)
    header = _pack_header(
        magic=FILE_MAGIC,
        format=FORMAT_VERSION,
        header_size=HEADER.size,
        flags=0,
        payload_len=len(payload),
        sha256=hashlib.sha256(payload).digest(),
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
    h = _header(data)
    version, hsize, flags, length = h["format"], h["header_size"], h["flags"], h["payload_len"]
    if h["magic"] != FILE_MAGIC:
        raise PatchFormatError("not a patchbox patch file (bad magic)")
    if version != FORMAT_VERSION:
        raise PatchFormatError(
            f"unsupported patch format version {version} (this reads {FORMAT_VERSION})"
        )
    if hsize != HEADER.size:
        raise PatchFormatError(f"bad header size {hsize}")
    if flags & ~C.FILE_FLAGS_KNOWN:
        raise PatchFormatError(
            f"unknown header flags {flags:#x} (this reads {C.FILE_FLAGS_KNOWN:#x})"
        )
    trailer = SIG_TRAILER.size if flags & FLAG_SIGNED else 0
    payload = data[HEADER.size : len(data) - trailer]
    if len(data) - HEADER.size - trailer != length:
        extra = f" and the {trailer}-byte signature" if trailer else ""
        raise PatchFormatError(
            f"patch file truncated or padded: header says {length} payload bytes{extra}, "
            f"file has {len(data) - HEADER.size} after the header"
        )
    if hashlib.sha256(payload).digest() != h["sha256"]:
        raise PatchFormatError("integrity hash mismatch: patch file is corrupt")
    if trailer:
        sig = _trailer(data)
        alg = sig["alg"]
        if sig["magic"] != SIG_MAGIC:
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
    if not _header(data)["flags"] & FLAG_SIGNED:
        return None
    sig = _trailer(data)
    return Signature(sig["alg"], sig["key_id"], sig["signature"], data[: -SIG_TRAILER.size])


def with_signature(data: bytes, key_id: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """Returns patch-file bytes ``data`` (signed or not) signed anew: header flag bit 0
    set, then the trailer with ``key_id`` and ``sign(header + payload)`` (64 bytes)."""
    split_patch_file(data)
    h = _header(data)
    header = _pack_header(**{**h, "flags": h["flags"] | FLAG_SIGNED})
    signed = header + data[HEADER.size : HEADER.size + h["payload_len"]]
    signature = sign(signed)
    if len(key_id) != SIG_WIDTHS["key_id"] or len(signature) != SIG_WIDTHS["signature"]:
        raise ValueError(
            f"key id must be {SIG_WIDTHS['key_id']} bytes and the signature "
            f"{SIG_WIDTHS['signature']}"
        )
    trailer = {"magic": SIG_MAGIC, "alg": SIG_ED25519, "key_id": key_id, "signature": signature}
    return signed + SIG_TRAILER.pack(*(trailer[name] for name in C.SIG_TRAILER_FIELDS))
