"""The patch file and apply-body byte layouts (docs/patch-format.md, docs/protocol.md).

Returns and accepts :class:`patchbox.format.model.Patch`; all structure is declared
here, all validation that a reader must do happens in :func:`decode_apply_body`.
"""
from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from patchbox.errors import PatchFormatError
from patchbox.format.codec import Reader, Writer
from patchbox.format.model import Fixup, Function, Patch
from patchbox.protocol import constants as C
from patchbox.protocol.constants import FixupBase, FixupSection, FixupType, RedirectKind

__all__ = [
    "FILE_MAGIC", "FORMAT_VERSION", "HEADER", "encode_apply_body", "decode_apply_body",
    "write_patch", "read_patch", "save_patch", "load_patch", "split_patch_file",
    "FLAG_SIGNED", "SIG_TRAILER", "SIG_MAGIC", "SIG_ED25519", "Signature", "split_signature",
    "with_signature",
]

FILE_MAGIC = b"PBXPATCH"
FORMAT_VERSION = 1
# magic, format version, header size, flags, payload length, sha256
HEADER = struct.Struct("<8sHHIQ32s")
NAME_RE = re.compile(r"^[A-Za-z0-9._+-]{1,%d}$" % C.MAX_NAME)
FIXUP_SIZE = {FixupType.PC32: 4, FixupType.ABS64: 8}
# Header flags: bit 0 = a signature trailer follows the payload (docs/patch-format.md).
FLAG_SIGNED = 0x1
# Signature trailer: magic, algorithm, key id (sha256 of the raw public key), signature
# over header + payload.
SIG_TRAILER = struct.Struct("<8sB32s64s")
SIG_MAGIC = b"PBXSIG01"
SIG_ED25519 = 1


def encode_apply_body(patch: Patch) -> bytes:
    """Returns the APPLY request payload for ``patch`` (also the file's body)."""
    check_name(patch.name)
    w = Writer()
    w.str(patch.name)
    w.u8(len(patch.build_id)).raw(patch.build_id)
    w.u32(patch.flags)
    w.blob(patch.text).blob(patch.data).u32(patch.bss_size)
    w.u16(len(patch.functions))
    for fn in patch.functions:
        w.str(fn.symbol).u64(fn.target).u32(fn.new_offset).u32(fn.new_size)
        w.u8(fn.kind).u8(fn.skip)
        w.u16(len(fn.expected)).raw(fn.expected)
    w.u32(len(patch.fixups))
    for fx in patch.fixups:
        w.u8(fx.section).u8(fx.type).u8(fx.base).u8(0).u32(fx.offset).i64(fx.addend)
        if fx.base == FixupBase.IMPORT:
            w.str(fx.symbol)
    return bytes(w)


def check_name(name: str) -> None:
    """Raises PatchFormatError unless ``name`` is a valid patch name."""
    if not NAME_RE.match(name):
        raise PatchFormatError(
            f"invalid patch name {name!r}: 1..{C.MAX_NAME} characters of A-Z a-z 0-9 . _ + -")


def decode_apply_body(body: bytes, meta: dict[str, str] | None = None) -> Patch:
    """Returns the Patch encoded in an apply body; raises PatchFormatError if invalid."""
    r = Reader(body, PatchFormatError, "patch body")
    name = r.str("name")
    check_name(name)
    bid_len = r.u8("build_id length")
    if not 1 <= bid_len <= C.MAX_BUILD_ID:
        raise PatchFormatError(f"patch body: build-id length {bid_len} out of range")
    build_id = r.raw(bid_len, "build_id")
    flags = r.u32("flags")
    text = r.blob("text")
    data = r.blob("data")
    bss_size = r.u32("bss_size")
    nfuncs = r.u16("nfuncs")
    if not 1 <= nfuncs <= C.MAX_FUNCS:
        raise PatchFormatError(f"patch body: {nfuncs} functions (1..{C.MAX_FUNCS} allowed)")
    functions = []
    for i in range(nfuncs):
        symbol = r.str(f"function[{i}].symbol")
        target = r.u64(f"function[{i}].target")
        new_offset = r.u32(f"function[{i}].new_offset")
        new_size = r.u32(f"function[{i}].new_size")
        kind_value = r.u8(f"function[{i}].kind")
        skip = r.u8(f"function[{i}].skip")
        try:
            kind = RedirectKind(kind_value)
        except ValueError as err:
            raise PatchFormatError(f"patch body: {symbol}: unknown redirect kind {kind_value}") from err
        if skip not in ((0, C.ENDBR_SKIP) if kind == RedirectKind.ENTRY_JUMP else (0,)):
            raise PatchFormatError(f"patch body: {symbol}: skip {skip} invalid for {kind.name}")
        exp_len = r.u16(f"function[{i}].expected length")
        if not C.MIN_EXPECTED <= exp_len <= C.MAX_EXPECTED:
            raise PatchFormatError(
                f"patch body: {symbol}: expected length {exp_len} out of range")
        expected = r.raw(exp_len, f"function[{i}].expected")
        # Any offset: a replacement without its own 6+2 NOPs is valid, only not stackable on.
        if new_offset >= len(text) or new_offset + new_size > len(text):
            raise PatchFormatError(
                f"patch body: {symbol}: replacement [{new_offset}, +{new_size}) outside "
                f"the {len(text)}-byte text")
        functions.append(Function(symbol, target, new_offset, new_size, expected, kind, skip))
    nfixups = r.u32("nfixups")
    if nfixups > C.MAX_FIXUPS:
        raise PatchFormatError(f"patch body: {nfixups} fix-ups (max {C.MAX_FIXUPS})")
    fixups = []
    for i in range(nfixups):
        section, ftype, base, _reserved = (r.u8(f"fixup[{i}].section"), r.u8(f"fixup[{i}].type"),
                                           r.u8(f"fixup[{i}].base"), r.u8(f"fixup[{i}].reserved"))
        offset = r.u32(f"fixup[{i}].offset")
        addend = r.i64(f"fixup[{i}].addend")
        try:
            section, ftype, base = FixupSection(section), FixupType(ftype), FixupBase(base)
        except ValueError as err:
            raise PatchFormatError(f"patch body: fixup[{i}]: {err}") from err
        symbol = r.str(f"fixup[{i}].symbol") if base == FixupBase.IMPORT else ""
        limit = len(text) if section == FixupSection.TEXT else len(data)
        if offset + FIXUP_SIZE[ftype] > limit:
            raise PatchFormatError(
                f"patch body: fixup[{i}] at {section.name.lower()}+{offset:#x} outside the "
                f"{limit}-byte {section.name.lower()}")
        fixups.append(Fixup(section, ftype, base, offset, addend, symbol))
    r.end()
    return Patch(name=name, build_id=build_id, text=text, functions=functions, fixups=fixups,
                 data=data, bss_size=bss_size, flags=flags, meta=dict(meta or {}))


def write_patch(patch: Patch) -> bytes:
    """Returns the bytes of an (unsigned) patch file for ``patch``."""
    payload = bytes(Writer().kv(patch.meta)) + encode_apply_body(patch)
    header = HEADER.pack(FILE_MAGIC, FORMAT_VERSION, HEADER.size, 0, len(payload),
                         hashlib.sha256(payload).digest())
    return header + payload


def split_patch_file(data: bytes) -> tuple[dict[str, str], bytes]:
    """Returns (meta, apply body) of a patch file after checking header, hash and, for a
    signed file, the layout of its signature trailer (not the signature: see
    :mod:`patchbox.signing`)."""
    if len(data) < HEADER.size:
        raise PatchFormatError(
            f"not a patchbox patch file: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, hsize, flags, length, digest = HEADER.unpack_from(data)
    if magic != FILE_MAGIC:
        raise PatchFormatError("not a patchbox patch file (bad magic)")
    if version != FORMAT_VERSION:
        raise PatchFormatError(f"unsupported patch format version {version} (this reads {FORMAT_VERSION})")
    if hsize != HEADER.size:
        raise PatchFormatError(f"bad header size {hsize}")
    if flags & ~FLAG_SIGNED:
        raise PatchFormatError(f"unknown header flags {flags:#x} (this reads {FLAG_SIGNED:#x})")
    trailer = SIG_TRAILER.size if flags & FLAG_SIGNED else 0
    payload = data[HEADER.size:len(data) - trailer]
    if len(data) - HEADER.size - trailer != length:
        extra = f" and the {trailer}-byte signature" if trailer else ""
        raise PatchFormatError(
            f"patch file truncated or padded: header says {length} payload bytes{extra}, "
            f"file has {len(data) - HEADER.size} after the header")
    if hashlib.sha256(payload).digest() != digest:
        raise PatchFormatError("integrity hash mismatch: patch file is corrupt")
    if trailer:
        sig_magic, alg, _key_id, _sig = SIG_TRAILER.unpack_from(data, len(data) - trailer)
        if sig_magic != SIG_MAGIC:
            raise PatchFormatError("signed patch file without a signature trailer (bad magic)")
        if alg != SIG_ED25519:
            raise PatchFormatError(f"unknown signature algorithm {alg} (this reads {SIG_ED25519} = Ed25519)")
    r = Reader(payload, PatchFormatError, "patch file")
    meta = r.kv("meta")
    return meta, payload[r.pos:]


def read_patch(data: bytes) -> Patch:
    """Returns the Patch in patch-file bytes (signed or not); raises PatchFormatError if
    invalid. The signature itself is checked by :func:`patchbox.signing.check_trust`."""
    meta, body = split_patch_file(data)
    return decode_apply_body(body, meta)


def save_patch(patch: Patch, path: str | Path) -> None:
    """Writes ``patch`` to ``path``."""
    Path(path).write_bytes(write_patch(patch))


def load_patch(path: str | Path) -> Patch:
    """Returns the Patch stored at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PatchFormatError(f"cannot read patch file {path}: {err.strerror}") from err
    try:
        return read_patch(data)
    except PatchFormatError as err:
        raise PatchFormatError(f"{path}: {err}") from err


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
    return Signature(alg, key_id, sig, data[:len(data) - SIG_TRAILER.size])


def with_signature(data: bytes, key_id: bytes, sign) -> bytes:
    """Returns patch-file bytes ``data`` (signed or not) signed anew: header flag bit 0
    set, then the trailer with ``key_id`` and ``sign(header + payload)`` (64 bytes)."""
    split_patch_file(data)
    magic, version, hsize, flags, length, digest = HEADER.unpack_from(data)
    header = HEADER.pack(magic, version, hsize, flags | FLAG_SIGNED, length, digest)
    signed = header + data[HEADER.size:HEADER.size + length]
    signature = sign(signed)
    if len(key_id) != 32 or len(signature) != 64:
        raise ValueError("key id must be 32 bytes and the signature 64")
    return signed + SIG_TRAILER.pack(SIG_MAGIC, SIG_ED25519, key_id, signature)
