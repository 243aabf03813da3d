"""Bad input matrix against a real running target (tier 2: `-m process`).

Every case sends one hostile input (a frame, a request, an apply body or a patch file
through the CLI) and checks: the reply (or CLI error) names the cause; the agent keeps
serving (INFO, and the target still computes); and every executable byte of the target
(its text and the sandbox) and the patch data area are byte-identical afterwards, read
through /proc/PID/mem. docs/robustness.md lists every case; test_refusals.py has more.

Every test runs for x86-64 (tier `process`) and for aarch64 under qemu-user (tier
`aarch64`; tests/e2e/arches.py), where the bytes are read at the guest's addresses (qemu
maps the guest 1:1 here, measured: live.Target.guest_base). The cases that name an
architecture's facts (the entry's NOPs, the fix-up types of the other architecture, the
machine field) take them from the target's ``Arch``; a case of one architecture only says
why in CASES.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import rawwire
from arches import ARCH_NAMES, arch_param, on_every_arch
from elftools.elf.elffile import ELFFile
from live import Target, arch_of

from helpers import compile_c, render
from patchbox.arch import EntryLayout, Machine, get_arch
from patchbox.extract import extract_patch
from patchbox.format.layout import HEADER, encode_apply_body, save_patch, write_patch
from patchbox.format.model import Fixup, Function, Patch
from patchbox.protocol.client import Client
from patchbox.wire import ErrorCode, FixupBase, FixupSection, FixupType, Msg


@pytest.fixture(scope="module")
def good(target_exe: Path, tmp_path_factory: pytest.TempPathFactory, arch: str) -> Patch:
    """A valid patch of use_helper (4 -> 49 instead of 41), with room for fix-ups."""
    d = tmp_path_factory.mktemp(f"badinputs-{arch}")
    obj = compile_c(render(USE_HELPER="scale(x) + 9"), d / "target.o", obj=True, arch=arch)
    patch = extract_patch(obj, target_exe, ["use_helper"], name="good")
    return replace(patch, text=patch.text + bytes(16))  # 16 spare bytes at the end of text


def state(target: Target) -> tuple[dict[int, bytes], bytes]:
    """Executable mappings of the exe (text + sandbox) and the patch data area."""
    with Client(target.socket) as c:
        info = c.info()
    data = target.read(int(info["data_addr"], 16), int(info["data_size"]))
    return target.code_snapshot(), data


def pages(snapshot: dict[int, bytes]) -> dict[int, bytes]:
    """Returns the code snapshot ``snapshot`` as {page address: its 4 KiB}."""
    return {
        start + i: code[i : i + 4096]
        for start, code in snapshot.items()
        for i in range(0, len(code), 4096)
    }


def still_serving(target: Target) -> None:
    status, _ = rawwire.request(target.socket, Msg.INFO)
    assert status == 0
    assert target.call("use_helper", 4) == "41"


def body_of(
    patch: Patch, name: bytes | None = None, build_id: bytes | None = None, flags: int | None = None
) -> bytes:
    """The apply body of ``patch`` with the leading fields replaced by raw values."""
    body = encode_apply_body(patch)
    old_name = patch.name.encode()
    rest = body[2 + len(old_name) + 1 + len(patch.build_id) + 4 :]
    name = old_name if name is None else name
    bid = patch.build_id if build_id is None else build_id
    fl = patch.flags if flags is None else flags
    return (
        struct.pack("<H", len(name)) + name + bytes([len(bid)]) + bid + struct.pack("<I", fl) + rest
    )


def machine_len(patch: Patch) -> int:
    """Returns the bytes of the machine field at the end of ``patch``'s apply body: none
    for x86-64 (the writer leaves it out), 2 for another architecture."""
    return 0 if patch.machine == Machine.X86_64 else 2


def machine_explicit(patch: Patch) -> bytes:
    """Returns the apply body of ``patch`` with its machine field written out."""
    return encode_apply_body(patch) + struct.pack("<H", patch.machine)[machine_len(patch) :]


def machine_absent(patch: Patch) -> bytes:
    """Returns the apply body of ``patch`` without its machine field."""
    body = encode_apply_body(patch)
    return body[: len(body) - machine_len(patch)]


def other_machine(patch: Patch) -> Machine:
    """Returns a machine patchbox knows that is not ``patch``'s."""
    return next(m for m in (Machine.AARCH64, Machine.X86_64) if m != patch.machine)


def nfuncs_offset(patch: Patch) -> int:
    return (
        2
        + len(patch.name)
        + 1
        + len(patch.build_id)
        + 4
        + 4
        + len(patch.text)
        + 4
        + len(patch.data)
        + 4
    )


def with_nfixups(patch: Patch, count: int) -> bytes:
    """The apply body of ``patch`` with its nfixups field set to ``count``."""
    body = encode_apply_body(patch)
    tail = sum(
        16 + (2 + len(fx.symbol.encode()) if fx.base == FixupBase.IMPORT else 0)
        for fx in patch.fixups
    )
    # ... nfixups, the fix-ups, nhooks and the hooks (5 bytes each), the machine field
    # (none in an x86-64 body: docs/patch-format.md, "Architecture")
    at = len(body) - machine_len(patch) - (2 + 5 * len(patch.hooks)) - tail - 4
    return body[:at] + struct.pack("<I", count) + body[at + 4 :]


def with_nfuncs(patch: Patch, count: int) -> bytes:
    """The apply body of ``patch`` with its nfuncs field set to ``count``."""
    body, at = encode_apply_body(patch), nfuncs_offset(patch)
    return body[:at] + struct.pack("<H", count) + body[at + 2 :]


def with_text_length(patch: Patch, length: int) -> bytes:
    """The apply body of ``patch`` with its text length field set to ``length``: after the
    name (2-byte length), the build-id (1-byte length) and the flags (4 bytes)."""
    body = encode_apply_body(patch)
    at = 2 + len(patch.name) + 1 + len(patch.build_id) + 4
    return body[:at] + struct.pack("<I", length) + body[at + 4 :]


def with_last_fixup_reserved(patch: Patch, value: int) -> bytes:
    """The apply body of ``patch`` with its last fix-up's reserved byte set to ``value``:
    before that fix-up's offset and addend (12 bytes), the body's hook count (2 bytes)
    and its machine field (none on x86-64)."""
    body = encode_apply_body(patch)
    at = len(body) - machine_len(patch) - 15
    return body[:at] + bytes([value]) + body[at + 1 :]


def fixup(patch: Patch, **kw: Any) -> Patch:
    """Returns ``patch`` with one more fix-up: an ABS64 at the text's last 8 bytes unless
    ``kw`` (Fixup's fields) says otherwise."""
    fx = Fixup(
        section=FixupSection.TEXT,
        type=FixupType.ABS64,
        base=FixupBase.ABS,
        offset=len(patch.text) - 8,
        addend=0,
        symbol="",
    )
    return replace(patch, fixups=[*patch.fixups, replace(fx, **kw)])


def link_address(exe: Path, section: str) -> int:
    with open(exe, "rb") as f:
        sec = ELFFile(f).get_section_by_name(section)
        assert sec is not None, f"{exe} has no {section}"
        addr: int = sec["sh_addr"]
        return addr


def info_of(target: Target) -> dict[str, str]:
    with Client(target.socket) as c:
        return c.info()


@dataclass
class Case:
    """One bad APPLY/REMOVE/... request: what to send (``payload(patch, target, exe)``),
    the code and words expected (``words(arch)`` where they name its facts), and the
    architectures it is a case of (``only``, with why in a comment)."""

    msg: int
    payload: Callable[..., bytes]
    code: ErrorCode
    words: tuple[str, ...] | Callable[[str], tuple[str, ...]] = ()
    only: tuple[str, ...] = ARCH_NAMES

    def words_of(self, arch: str) -> tuple[str, ...]:
        """Returns the words the error text must hold on ``arch``."""
        return self.words(arch) if callable(self.words) else self.words


def fn0(p: Patch) -> Function:
    return p.functions[0]


def entry_of(t: Target) -> EntryLayout:
    """Returns the patchable entry of the running target's architecture."""
    return arch_of(t.exe).entry


# What the agent says an entry that is not one lacks (SANDBOX_ARCH_ENTRY_DESC).
ENTRY_DESC = {"x86_64": "8 NOPs", "aarch64": "4+1 NOPs"}


CASES: dict[str, Case] = {
    # -- messages other than APPLY
    "info-with-payload": Case(Msg.INFO, lambda p, t, e: b"x", ErrorCode.MALFORMED, ("trailing",)),
    "list-with-payload": Case(
        Msg.LIST, lambda p, t, e: b"\0\0", ErrorCode.MALFORMED, ("trailing",)
    ),
    "debug-value-2": Case(Msg.DEBUG, lambda p, t, e: b"\x02", ErrorCode.MALFORMED, ("on = 2",)),
    "debug-empty": Case(Msg.DEBUG, lambda p, t, e: b"", ErrorCode.MALFORMED, ("on",)),
    "remove-name-overruns": Case(
        Msg.REMOVE, lambda p, t, e: b"\xff\x00abc", ErrorCode.MALFORMED, ("name", "runs past")
    ),
    "remove-trailing": Case(
        Msg.REMOVE, lambda p, t, e: b"\x01\x00ab", ErrorCode.MALFORMED, ("trailing",)
    ),
    "remove-unknown-binary-name": Case(
        Msg.REMOVE, lambda p, t, e: b"\x03\x00\x01\xffz", ErrorCode.NOT_APPLIED, ("??z",)
    ),
    # -- apply body: framing of fields
    "empty-apply": Case(Msg.APPLY, lambda p, t, e: b"", ErrorCode.MALFORMED, ("name",)),
    "name-empty": Case(Msg.APPLY, lambda p, t, e: body_of(p, name=b""), ErrorCode.BAD_NAME),
    "name-space": Case(
        Msg.APPLY, lambda p, t, e: body_of(p, name=b"bad name"), ErrorCode.BAD_NAME, ("bad name",)
    ),
    "name-64-bytes": Case(
        Msg.APPLY, lambda p, t, e: body_of(p, name=b"n" * 64), ErrorCode.BAD_NAME
    ),
    "name-nul": Case(
        Msg.APPLY, lambda p, t, e: body_of(p, name=b"a\0b"), ErrorCode.BAD_NAME, ("a?b",)
    ),
    "build-id-len-0": Case(
        Msg.APPLY,
        lambda p, t, e: body_of(p, build_id=b""),
        ErrorCode.MALFORMED,
        ("build_id_len 0",),
    ),
    "build-id-65": Case(
        Msg.APPLY,
        lambda p, t, e: body_of(p, build_id=b"\1" * 65),
        ErrorCode.MALFORMED,
        ("build_id_len 65",),
    ),
    "build-id-short": Case(
        Msg.APPLY,
        lambda p, t, e: body_of(p, build_id=p.build_id[:8]),
        ErrorCode.BUILD_ID_MISMATCH,
        ("running",),
    ),
    "flags-unknown-bit": Case(
        Msg.APPLY, lambda p, t, e: body_of(p, flags=4), ErrorCode.MALFORMED, ("flags",)
    ),
    "trailing-byte": Case(
        Msg.APPLY,
        lambda p, t, e: machine_explicit(p) + b"\0",
        ErrorCode.MALFORMED,
        ("1 trailing bytes after the machine",),
    ),
    "text-length-lies": Case(
        Msg.APPLY,
        lambda p, t, e: with_text_length(p, 0xFFFFFF00),
        ErrorCode.MALFORMED,
        ("text",),
    ),
    "nfuncs-0": Case(
        Msg.APPLY,
        lambda p, t, e: with_nfuncs(p, 0),
        ErrorCode.MALFORMED,
        ("nfuncs 0",),
    ),
    "nfuncs-overruns": Case(
        Msg.APPLY,
        lambda p, t, e: with_nfuncs(p, 200),
        ErrorCode.MALFORMED,
        ("runs past",),
    ),
    "nfuncs-257": Case(
        Msg.APPLY,
        lambda p, t, e: with_nfuncs(p, 257),
        ErrorCode.MALFORMED,
        ("nfuncs 257",),
    ),
    "nfixups-overruns": Case(
        Msg.APPLY,
        lambda p, t, e: with_nfixups(p, len(p.fixups) + 0x10000),
        ErrorCode.MALFORMED,
        ("nfixups",),
    ),
    "nfixups-huge": Case(
        Msg.APPLY, lambda p, t, e: with_nfixups(p, 0xFFFFFFFF), ErrorCode.MALFORMED, ("nfixups",)
    ),
    "expected-7-bytes": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(p, functions=[replace(fn0(p), expected=fn0(p).expected[:7])])
        ),
        ErrorCode.MALFORMED,
        ("expected_len 7",),
    ),
    "expected-65-bytes": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(p, functions=[replace(fn0(p), expected=bytes(65))])
        ),
        ErrorCode.MALFORMED,
        ("expected_len 65",),
    ),
    "symbol-empty": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(replace(p, functions=[replace(fn0(p), symbol="")])),
        ErrorCode.MALFORMED,
        ("symbol length 0",),
    ),
    # -- apply: where the functions are
    "replacement-outside-text": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(p, functions=[replace(fn0(p), new_size=len(p.text))])
        ),
        ErrorCode.MALFORMED,
        ("use_helper", "outside text"),
    ),
    "target-in-data": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(p, functions=[replace(fn0(p), target=link_address(e, ".data") + 16)])
        ),
        ErrorCode.TARGET_OUT_OF_TEXT,
        ("use_helper",),
    ),
    "target-zero": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(replace(p, functions=[replace(fn0(p), target=0)])),
        ErrorCode.TARGET_OUT_OF_TEXT,
    ),
    "target-in-sandbox": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(
                p,
                functions=[
                    replace(
                        fn0(p),
                        target=int(info_of(t)["sandbox_addr"], 16)
                        - int(info_of(t)["load_bias"], 16)
                        + 72,  # 4-byte aligned: not refused as mid-instruction first (aarch64)
                    )
                ],
            )
        ),
        ErrorCode.TARGET_OUT_OF_TEXT,
        ("inside the sandbox",),
    ),
    "target-mid-function": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(
                p,
                functions=[
                    replace(
                        fn0(p),
                        # where the entry's last NOP ends: 2 bytes in, 4 on aarch64
                        target=fn0(p).target + entry_of(t).at,
                        expected=t.read(
                            int(info_of(t)["load_bias"], 16)
                            + fn0(p).target
                            + entry_of(t).at
                            - entry_of(t).pad,
                            len(fn0(p).expected),
                        ),
                    )
                ],
            )
        ),
        ErrorCode.NO_PATCHABLE_ENTRY,
        lambda arch: ("use_helper", f"not {ENTRY_DESC[arch]}"),
    ),
    "functions-overlap": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            replace(p, functions=[fn0(p), replace(fn0(p), symbol="again")])
        ),
        ErrorCode.OVERLAP,
        ("use_helper", "again"),
    ),
    "expected-bytes-differ": Case(
        Msg.APPLY,
        # the entry's NOPs, then zeros where the function's first instruction is
        lambda p, t, e: encode_apply_body(
            replace(
                p,
                functions=[
                    replace(
                        fn0(p),
                        expected=entry_of(t).nops
                        + bytes(len(fn0(p).expected) - len(entry_of(t).nops)),
                    )
                ],
            )
        ),
        ErrorCode.EXPECTED_MISMATCH,
        lambda arch: (f"use_helper+{get_arch(arch).entry.at:#x}",),
    ),
    # -- apply: fix-ups
    "fixup-outside-text": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, offset=len(p.text) - 4)),
        ErrorCode.FIXUP_RANGE,
        ("text",),
    ),
    "fixup-offset-huge": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, offset=0xFFFFFFFC, type=FixupType.PC32)),
        ErrorCode.FIXUP_RANGE,
    ),
    "fixup-in-missing-data": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            fixup(replace(p, data=b"", bss_size=0), section=FixupSection.DATA, offset=0)
        ),
        ErrorCode.FIXUP_RANGE,
        ("data",),
    ),
    # aarch64's instruction fix-ups (3..10) are another architecture's on x86-64: refused
    # by name. (x86-64 has no type of its own: on aarch64, 3..10 are its own, checked
    # against the instruction they patch, below.)
    "fixup-type-3": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, type=FixupType.BRANCH26, offset=8)),
        ErrorCode.BAD_FIXUP,
        ("type 3 (not a fix-up type of x86_64)",),
        only=("x86_64",),
    ),
    "fixup-type-10": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, type=FixupType.LDST128_LO12, offset=8)),
        ErrorCode.BAD_FIXUP,
        ("type 10 (not a fix-up type of x86_64)",),
        only=("x86_64",),
    ),
    "fixup-type-11": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, type=11)),
        ErrorCode.BAD_FIXUP,
        lambda arch: (f"type 11 (not a fix-up type of {arch})",),
    ),
    "fixup-base-0": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, base=0)),
        ErrorCode.BAD_FIXUP,
        ("base 0",),
    ),
    "fixup-base-6": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, base=6)),
        ErrorCode.BAD_FIXUP,
        ("base 6",),
    ),
    "fixup-section-2": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, section=2)),
        ErrorCode.BAD_FIXUP,
        ("section 2",),
    ),
    "fixup-reserved-set": Case(
        Msg.APPLY,
        # The last fix-up's reserved byte: before its offset and addend (12 bytes) and
        # the body's hook count (2 bytes).
        lambda p, t, e: with_last_fixup_reserved(fixup(p), 7),
        ErrorCode.BAD_FIXUP,
        ("reserved 7",),
    ),
    "fixup-data-base-without-data": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            fixup(replace(p, data=b"", bss_size=0), base=FixupBase.DATA)
        ),
        ErrorCode.BAD_FIXUP,
        ("no data",),
    ),
    "import-missing-symbol": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            fixup(p, base=FixupBase.IMPORT, symbol="patchbox_no_such_symbol")
        ),
        ErrorCode.SYMBOL_NOT_FOUND,
        ("patchbox_no_such_symbol",),
    ),
    "import-empty-symbol": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(fixup(p, base=FixupBase.IMPORT, symbol="")),
        ErrorCode.BAD_FIXUP,
        ("import symbol length 0",),
    ),
    "pc32-overflow": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(
            fixup(p, type=FixupType.PC32, offset=len(p.text) - 4, addend=1 << 40)
        ),
        ErrorCode.FIXUP_OVERFLOW,
        ("fix-up",),
    ),
    # -- apply: space
    "data-bigger-than-area": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(replace(p, bss_size=1 << 30)),
        ErrorCode.SANDBOX_FULL,
        ("data",),
    ),
    # -- apply: the architecture (the body's last field, docs/patch-format.md)
    "machine-aarch64": Case(
        Msg.APPLY,
        lambda p, t, e: encode_apply_body(replace(p, machine=Machine.AARCH64)),
        ErrorCode.WRONG_MACHINE,
        ("is for aarch64 (e_machine 183)", "this process is x86_64 (e_machine 62)"),
        only=("x86_64",),
    ),
    "machine-x86_64": Case(
        Msg.APPLY,
        lambda p, t, e: machine_explicit(replace(p, machine=Machine.X86_64)),
        ErrorCode.WRONG_MACHINE,
        ("is for x86_64 (e_machine 62)", "this process is aarch64 (e_machine 183)"),
        only=("aarch64",),
    ),
    # No field means x86-64 (every body before it existed): on x86-64 that applies
    # (test_body_with_machine_x86_64_applies), on aarch64 it is another machine's.
    "machine-absent": Case(
        Msg.APPLY,
        lambda p, t, e: machine_absent(p),
        ErrorCode.WRONG_MACHINE,
        ("is for x86_64 (e_machine 62)", "this process is aarch64"),
        only=("aarch64",),
    ),
    "machine-unknown": Case(
        Msg.APPLY,
        lambda p, t, e: machine_absent(p) + struct.pack("<H", 0xFFFF),
        ErrorCode.WRONG_MACHINE,
        lambda arch: ("unknown architecture (e_machine 65535)", arch),
    ),
    "machine-one-byte": Case(
        Msg.APPLY,
        lambda p, t, e: machine_absent(p) + struct.pack("<H", p.machine)[:1],
        ErrorCode.MALFORMED,
        ("machine", "runs past"),
    ),
}


@pytest.mark.parametrize(
    ("arch", "case"),
    [
        arch_param(arch, case, id=f"{arch}-{case}")
        for arch in ARCH_NAMES
        for case, c in CASES.items()
        if arch in c.only
    ],
    indirect=["arch"],
    scope="session",  # the arch fixture's: one target build per architecture
)
def test_bad_request(target: Target, target_exe: Path, good: Patch, arch: str, case: str) -> None:
    c = CASES[case]
    payload = c.payload(good, target, target_exe)
    before = state(target)
    with rawwire.connect(target.socket) as s:
        s.sendall(rawwire.frame(c.msg, payload))
        rtype, seq, status, rest = rawwire.recv_reply(s)
        text = rawwire.error_text(rest) if status else ""
        assert (rtype, seq) == (c.msg | 0x80, 7)
        assert status == c.code, (ErrorCode(status).name, text)
        for word in c.words_of(arch):
            assert word in text, text
        # The same connection still serves.
        s.sendall(rawwire.frame(Msg.LIST, seq=8))
        assert rawwire.recv_reply(s)[1:3] == (8, 0)
    assert state(target) == before
    still_serving(target)


@on_every_arch
def test_good_body_applies(target: Target, good: Patch) -> None:
    """The base of every case above is valid: only the one change makes it bad. And the
    cases' "byte-identical" check sees what an apply writes (the entry in the text, the
    copy in the sandbox): on aarch64 too, where it reads the guest's memory."""
    text = pages(state(target)[0])
    status, rest = rawwire.request(target.socket, Msg.APPLY, encode_apply_body(good))
    assert status == 0, rawwire.error_text(rest)
    assert target.call("use_helper", 4) == "49"
    after = pages(state(target)[0])
    assert after.keys() == text.keys()  # the same pages (mprotect may split mappings)
    assert [a for a in text if after[a] != text[a]], "the snapshot did not see the apply"
    with Client(target.socket) as c:
        sandbox = int(c.info()["sandbox_addr"], 16)
    page = sandbox - sandbox % 4096
    assert after[page] != text[page], "the sandbox's first page is not in the snapshot"


@pytest.mark.process  # x86-64's own: its writer leaves the field out (aarch64: machine-absent)
def test_body_with_machine_x86_64_applies(target: Target, good: Patch) -> None:
    """The writer leaves the field out for x86-64 (what agents linked before it read to
    the end); a body that carries it, `3e 00`, applies the same."""
    body = encode_apply_body(good)
    assert encode_apply_body(replace(good, machine=Machine.AARCH64)) == body + b"\xb7\x00"
    with_field = body + struct.pack("<H", Machine.X86_64)
    status, rest = rawwire.request(target.socket, Msg.APPLY, with_field)
    assert status == 0, rawwire.error_text(rest)
    assert target.call("use_helper", 4) == "49"


# -- frames --------------------------------------------------------------------------------


def frame_case(
    target: Target, data: bytes, code: ErrorCode | None, *words: str, then_info: bool
) -> None:
    """Sends raw bytes; expects one error reply (or none), then INFO on the same
    connection if ``then_info`` (else the agent closes it)."""
    before = state(target)
    with rawwire.connect(target.socket) as s:
        s.sendall(data)
        if code is not None:
            _t, _s, status, rest = rawwire.recv_reply(s)
            assert status == code, (ErrorCode(status).name, rawwire.error_text(rest))
            for word in words:
                assert word in rawwire.error_text(rest)
        if then_info:
            s.sendall(rawwire.frame(Msg.INFO, seq=9))
            assert rawwire.recv_reply(s)[1:3] == (9, 0)
        else:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the agent
    assert state(target) == before
    still_serving(target)


@on_every_arch
def test_wrong_magic_closes(target: Target) -> None:
    frame_case(
        target,
        rawwire.frame(Msg.INFO, magic=0x32584250),
        ErrorCode.BAD_MAGIC,
        "0x32584250",
        then_info=False,
    )


@on_every_arch
def test_wrong_version_skips_payload(target: Target, good: Patch) -> None:
    frame_case(
        target,
        rawwire.frame(Msg.APPLY, encode_apply_body(good), version=2),
        ErrorCode.BAD_VERSION,
        "version 2",
        then_info=True,
    )
    assert target.call("use_helper", 4) == "41"  # the skipped APPLY did nothing


@pytest.mark.parametrize("mtype", [0, 7, 0x83, 0xFFFF])
@on_every_arch
def test_unknown_message_ids(target: Target, mtype: int) -> None:
    frame_case(
        target,
        rawwire.frame(mtype, b"payload"),
        ErrorCode.UNKNOWN_MESSAGE,
        f"type {mtype}",
        then_info=True,
    )


@on_every_arch
def test_length_just_over_maximum(target: Target) -> None:
    frame_case(
        target,
        rawwire.frame(Msg.APPLY, length=(16 << 20) + 1),
        ErrorCode.TOO_LARGE,
        "16777217",
        then_info=False,
    )


@on_every_arch
def test_length_shorter_than_payload(target: Target, good: Patch) -> None:
    """The header says 20 bytes, 1 body follows: the first 20 are a (malformed) APPLY, the
    rest is read as the next header, whose magic is wrong."""
    body = encode_apply_body(good)
    before = state(target)
    with rawwire.connect(target.socket) as s:
        s.sendall(rawwire.frame(Msg.APPLY, body, length=20))
        assert rawwire.recv_reply(s)[2] == ErrorCode.MALFORMED
        assert rawwire.recv_reply(s)[2] == ErrorCode.BAD_MAGIC
    assert state(target) == before
    still_serving(target)


@pytest.mark.parametrize("sent", [0, 10, 16, 100])
@on_every_arch
def test_length_longer_than_sent_then_hangup(target: Target, good: Patch, sent: int) -> None:
    frame = rawwire.frame(Msg.APPLY, encode_apply_body(good))
    before = state(target)
    with rawwire.connect(target.socket) as s:
        s.sendall(frame[:sent])
    still_serving(target)
    assert state(target) == before


@on_every_arch
def test_random_garbage_sizes(target: Target) -> None:
    for size in (1, 15, 16, 17, 4096):
        before = state(target)
        with rawwire.connect(target.socket) as s:
            s.sendall(b"\xa5" * size)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:  # closed by the agent with input unread
                pass
        assert state(target) == before
    still_serving(target)


@on_every_arch
def test_many_frames_one_connection(target: Target) -> None:
    """Two hundred pipelined bad requests, each answered in order."""
    with rawwire.connect(target.socket) as s:
        s.sendall(b"".join(rawwire.frame(Msg.REMOVE, b"\x01\x00x", seq=i) for i in range(200)))
        for i in range(200):
            _t, seq, status, _rest = rawwire.recv_reply(s)
            assert (seq, status) == (i, ErrorCode.NOT_APPLIED)
    still_serving(target)


# -- duplicate apply, patch files through the CLI ---------------------------------------


@on_every_arch
def test_duplicate_apply_other_content(target: Target, good: Patch) -> None:
    assert rawwire.request(target.socket, Msg.APPLY, encode_apply_body(good))[0] == 0
    before = state(target)
    other = replace(good, text=good.text[:-1] + b"\xcc")
    status, rest = rawwire.request(target.socket, Msg.APPLY, encode_apply_body(other))
    assert status == ErrorCode.ALREADY_APPLIED and "good" in rawwire.error_text(rest)
    assert state(target) == before
    assert target.call("use_helper", 4) == "49"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "patchbox"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PATCHBOX_TRUST_DIR": ""},
        timeout=60,
        check=False,
    )


def corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[:-7]
    if how == "padded":
        return data + b"\0"
    if how == "bad-magic":
        return b"PBXPATCX" + data[8:]
    if how == "version-2":
        return data[:8] + b"\x02\x00" + data[10:]
    if how == "flipped-payload-bit":
        return data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]
    if how == "signed-flag-without-trailer":
        return data[:12] + b"\x01\x00\x00\x00" + data[16:]
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, words",
    [
        ("truncated", "truncated or padded"),
        ("padded", "truncated or padded"),
        ("bad-magic", "not a patchbox patch file"),
        ("version-2", "unsupported patch format version 2"),
        ("flipped-payload-bit", "integrity hash mismatch"),
        ("signed-flag-without-trailer", "truncated or padded"),
        ("empty", "shorter than the"),
    ],
)
@on_every_arch
def test_corrupt_patch_file_via_cli(
    target: Target, good: Patch, tmp_path: Path, how: str, words: str
) -> None:
    path = tmp_path / "bad.pbx"
    path.write_bytes(corrupt(write_patch(good), how))
    before = state(target)
    run = cli("apply", "-p", str(target.pid), str(path))
    assert run.returncode == 1
    assert run.stderr.startswith("patchbox: error: ") and words in run.stderr, run.stderr
    assert str(path) in run.stderr
    assert state(target) == before
    still_serving(target)


@on_every_arch
def test_file_with_valid_hash_but_bad_body_via_cli(
    target: Target, good: Patch, tmp_path: Path
) -> None:
    """A body the hash protects but that is itself invalid (a hand-made file)."""
    import hashlib

    data = write_patch(good)
    # the machine field (written out on x86-64) and one trailing byte after it, hash
    # recomputed
    payload = data[HEADER.size :] + struct.pack("<H", good.machine)[machine_len(good) :] + b"\0"
    header = HEADER.pack(
        b"PBXPATCH", 1, HEADER.size, 0, len(payload), hashlib.sha256(payload).digest()
    )
    path = tmp_path / "handmade.pbx"
    path.write_bytes(header + payload)
    before = state(target)
    run = cli("apply", "-p", str(target.pid), str(path))
    assert run.returncode == 1 and "trailing bytes" in run.stderr, run.stderr
    assert state(target) == before
    still_serving(target)


@on_every_arch
def test_patch_for_other_build_via_cli(target: Target, good: Patch, tmp_path: Path) -> None:
    path = tmp_path / "other.pbx"
    save_patch(replace(good, build_id=bytes(20)), path)
    before = state(target)
    run = cli("apply", "-p", str(target.pid), str(path))
    assert run.returncode == 1 and "build-id" in run.stderr and "0" * 40 in run.stderr, run.stderr
    assert state(target) == before
    still_serving(target)
