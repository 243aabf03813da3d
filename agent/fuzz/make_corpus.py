#!/usr/bin/env python3
"""Writes the seed corpus of the agent fuzz harness (agent/fuzz/fuzz_agent.c).

Every seed is the byte stream of one client connection, made with the real encoders
(patchbox.format.layout.encode_apply_body, patchbox.protocol.client.encode_frame):
valid INFO/LIST/APPLY/REMOVE/TEST/DEBUG frames, APPLY requests that pass every check
against the harness's victims (build-id, link-time addresses and expected bytes as
fuzz_agent.c sets them up), sequences (apply, stack, list, remove), and a few broken
frames. With --store, the seeds of the store harness (fuzz_store) instead: patch files
as `patchbox install` stores them (write_patch), signed and unsigned, and broken ones.
Usage: make_corpus.py [--store] [DIR]   (default: corpus/ or corpus-store/ beside this file)
"""

from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import replace
from pathlib import Path

from patchbox import wire as C
from patchbox.format.layout import encode_apply_body, with_signature, write_patch
from patchbox.format.model import Fixup, Function, Patch
from patchbox.protocol.client import FRAME, encode_frame
from patchbox.wire import FixupBase, FixupSection, FixupType, Msg

# Must match fuzz_agent.c.
BUILD_ID = b"patchbox-fuzz-bid-01"
LINK_BASE = 0x10000
VICTIM_SIZE = 64
VICTIM = bytes([0x90] * 8 + [0x8D, 0x47, 0x01, 0xC3]) + b"\xcc" * 52


def victim(k: int) -> int:
    """Link-time address of victim k's entry."""
    return LINK_BASE + VICTIM_SIZE * k + 6


def replacement(value: int) -> bytes:
    """6+2 NOPs (stackable entry at 6), mov eax, value; ret."""
    return b"\x90" * 8 + b"\xb8" + struct.pack("<I", value) + b"\xc3"


def patch(
    name: str,
    victims: list[int],
    *,
    fixups: list[Fixup] | None = None,
    data: bytes = b"",
    bss: int = 0,
    expected_len: int = 16,
    extra_text: bytes = b"",
) -> Patch:
    text = b""
    functions = []
    for k in victims:
        off = len(text) + 6
        text += replacement(0x1000 + k)
        functions.append(
            Function(f"victim{k}", victim(k), off, len(text) - off, VICTIM[:expected_len])
        )
    return Patch(
        name=name,
        build_id=BUILD_ID,
        text=text + extra_text,
        functions=functions,
        fixups=list(fixups or []),
        data=data,
        bss_size=bss,
    )


def apply(p: Patch, seq: int = 1) -> bytes:
    return encode_frame(Msg.APPLY, seq, encode_apply_body(p))


def remove(name: str, seq: int = 2) -> bytes:
    n = name.encode()
    return encode_frame(Msg.REMOVE, seq, struct.pack("<H", len(n)) + n)


def with_header(frame: bytes, **fields: int) -> bytes:
    """Returns ``frame`` with the named fields of its header (C.HEADER_FIELDS) replaced."""
    header = dict(zip(C.HEADER_FIELDS, FRAME.unpack_from(frame), strict=True)) | fields
    return FRAME.pack(*(header[name] for name in C.HEADER_FIELDS)) + frame[FRAME.size :]


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    out["info"] = encode_frame(Msg.INFO, 1)
    out["list"] = encode_frame(Msg.LIST, 1)
    out["test"] = encode_frame(Msg.TEST, 1)
    out["debug-off"] = encode_frame(Msg.DEBUG, 1, b"\x00")
    out["remove-unknown"] = remove("nothere", 1)
    simple = patch("simple", [0])
    out["apply"] = apply(simple)
    out["apply-list-remove-info"] = (
        apply(simple) + encode_frame(Msg.LIST, 2) + remove("simple", 3) + encode_frame(Msg.INFO, 4)
    )
    out["apply-twice"] = apply(simple) + apply(simple, 2)
    out["apply-two-functions"] = apply(patch("two", [1, 2], expected_len=64))
    # Stacking: a second patch on victim 3 sits on the first; removal top first.
    out["stack"] = (
        apply(patch("lower", [3]))
        + apply(patch("upper", [3]), 2)
        + remove("lower", 3)
        + remove("upper", 4)
        + remove("lower", 5)
    )
    tail = b"\x00" * 16  # room for fix-ups after the code
    fx = [
        Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.TEXT, 16, 0),
        Fixup(FixupSection.TEXT, FixupType.ABS64, FixupBase.DATA, 20, 8),
        Fixup(FixupSection.DATA, FixupType.ABS64, FixupBase.TEXT, 0, 6),
        Fixup(FixupSection.DATA, FixupType.ABS64, FixupBase.IMPORT, 8, 0, "malloc"),
        Fixup(FixupSection.DATA, FixupType.PC32, FixupBase.EXE, 16, victim(4)),
        Fixup(FixupSection.DATA, FixupType.ABS64, FixupBase.ABS, 24, 0x1234),
    ]
    out["apply-fixups"] = apply(
        patch("fixups", [4], fixups=fx, data=b"\x00" * 32, bss=64, extra_text=tail)
    ) + encode_frame(Msg.LIST, 2)
    out["apply-import-missing"] = apply(
        patch(
            "imp",
            [5],
            fixups=[
                Fixup(
                    FixupSection.TEXT,
                    FixupType.ABS64,
                    FixupBase.IMPORT,
                    16,
                    0,
                    "no_such_symbol_xyz",
                )
            ],
            extra_text=tail,
        )
    )
    out["apply-pc32-overflow"] = apply(
        patch(
            "ovf",
            [5],
            fixups=[Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.ABS, 16, 1 << 62)],
            extra_text=tail,
        )
    )
    out["apply-wrong-bid"] = apply(replace(simple, build_id=b"\x01" * 20))
    ov = patch("ov", [6, 7])
    ov.functions[1].target = ov.functions[0].target + 2
    out["apply-overlap"] = apply(ov)
    out["apply-full"] = apply(patch("big", [6], extra_text=b"\xcc" * 70000))
    # Broken frames.
    good = apply(simple)
    out["bad-magic"] = with_header(good, magic=int.from_bytes(b"XXXX", "little"))
    out["bad-version"] = with_header(good, version=2) + encode_frame(Msg.INFO, 9)
    out["unknown-type"] = encode_frame(0x55, 1, b"abc") + encode_frame(Msg.INFO, 2)
    out["too-large"] = with_header(encode_frame(Msg.APPLY, 1), length=0xFFFFFFFF)
    out["length-lies"] = with_header(good, length=len(good) + 100)
    out["truncated-body"] = encode_frame(Msg.APPLY, 1, encode_apply_body(simple)[:40])
    out["trailing"] = encode_frame(Msg.APPLY, 1, encode_apply_body(simple) + b"\x00")
    body = bytearray(
        encode_apply_body(
            patch(
                "cnt",
                [0],
                fixups=[Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.TEXT, 16, 0)],
                extra_text=tail,
            )
        )
    )
    body[-20:-16] = struct.pack("<I", 0xFFFFFF)  # nfixups overruns the payload
    out["count-overrun"] = encode_frame(Msg.APPLY, 1, bytes(body))
    out["header-only"] = good[:10]
    return out


def store_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    simple = write_patch(patch("simple", [0]))
    out["store-simple"] = simple
    out["store-two"] = write_patch(patch("two", [1, 2], expected_len=64))
    out["store-meta"] = write_patch(replace(patch("meta", [3]), meta={"tool": "x", "k": "v" * 40}))
    out["store-signed"] = with_signature(simple, b"\x11" * 32, lambda _d: b"\x22" * 64)
    out["store-wrong-bid"] = write_patch(replace(patch("bid", [0]), build_id=b"\x01" * 20))
    out["store-bad-magic"] = b"XXXXXXXX" + simple[8:]
    out["store-short"] = simple[:40]
    out["store-padded"] = simple + b"\x00"
    bad_flags = bytearray(simple)
    bad_flags[12] = 0x02
    out["store-bad-flags"] = bytes(bad_flags)
    return out


def main() -> None:
    args = sys.argv[1:]
    store = "--store" in args
    args = [a for a in args if a != "--store"]
    default = "corpus-store" if store else "corpus"
    out = Path(args[0]) if args else Path(__file__).resolve().parent / default
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (store_seeds() if store else seeds()).items():
        (out / f"{name}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)


if __name__ == "__main__":
    main()
