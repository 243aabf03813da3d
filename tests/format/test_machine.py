"""The apply body's architecture field (docs/patch-format.md, "Architecture"): written
for every machine but the one its absence means (x86-64, whose bodies stay byte for byte
what agents linked before the field read), optional when read, unknown values refused,
and the skip rule that depends on it."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from helpers import make_patch
from patchbox.arch import Machine
from patchbox.errors import PatchFormatError
from patchbox.format.layout import decode_apply_body, encode_apply_body, read_patch, write_patch
from patchbox.format.model import Fixup, Patch
from patchbox.wire import APPLY_BODY, FixupBase, FixupSection, FixupType, RedirectKind


def with_skip(patch: Patch, skip: int, kind: RedirectKind = RedirectKind.PATCHABLE_ENTRY) -> Patch:
    fn = replace(patch.functions[0], skip=skip, kind=kind)
    return replace(patch, functions=[fn, *patch.functions[1:]])


def test_written_last_and_read_back() -> None:
    for machine in Machine:
        body = encode_apply_body(replace(make_patch(), machine=machine))
        assert decode_apply_body(body).machine == machine
        x86_64 = encode_apply_body(replace(make_patch(), machine=Machine.X86_64))
        if machine != Machine.X86_64:
            assert body[-2:] == struct.pack("<H", machine)
            assert body[:-2] == x86_64, "the field is the body's only difference"
    assert APPLY_BODY[-1].name == "machine" and APPLY_BODY[-1].optional


def test_x86_64_body_is_the_body_before_the_field() -> None:
    """What an agent linked before the field reads to its end: the body ends after the
    hooks (the hook count, then the hooks), nothing after them."""
    patch = make_patch()
    body = encode_apply_body(patch)
    assert body.endswith(struct.pack("<H", len(patch.hooks)))


def test_body_without_it_is_x86_64() -> None:
    """A body written before the field existed ends after the hooks."""
    body = encode_apply_body(replace(make_patch(), machine=Machine.AARCH64))
    assert decode_apply_body(body[:-2]).machine == Machine.X86_64


def test_file_round_trip() -> None:
    patch = replace(make_patch(), machine=Machine.AARCH64)
    assert read_patch(write_patch(patch)).machine == Machine.AARCH64


@pytest.mark.parametrize(
    ("tail", "words"),
    [
        (struct.pack("<H", 40), "machine 40 is no architecture patchbox knows"),
        (b"\xb7", "machine"),  # one byte of two
        (struct.pack("<H", 62) + b"\0", "trailing"),
    ],
)
def test_refused(tail: bytes, words: str) -> None:
    body = encode_apply_body(make_patch()) + tail
    with pytest.raises(PatchFormatError, match=words):
        decode_apply_body(body)


def test_skip_rule_per_machine() -> None:
    """skip 4 (past bti c) is valid for a patchable entry on aarch64 only; an entry jump
    may skip 4 on both (endbr64, bti c); nothing else."""
    aarch64 = replace(make_patch(), machine=Machine.AARCH64)
    assert decode_apply_body(encode_apply_body(with_skip(aarch64, 4))).functions[0].skip == 4
    with pytest.raises(PatchFormatError, match="skip 4 invalid for PATCHABLE_ENTRY on x86_64"):
        decode_apply_body(encode_apply_body(with_skip(make_patch(), 4)))
    for patch in (make_patch(), aarch64):
        jump = with_skip(patch, 4, RedirectKind.ENTRY_JUMP)
        assert decode_apply_body(encode_apply_body(jump)).functions[0].skip == 4
        with pytest.raises(PatchFormatError, match="skip 2"):
            decode_apply_body(encode_apply_body(with_skip(patch, 2)))


def test_fixup_types_of_the_patchs_machine_only() -> None:
    """aarch64's instruction fix-ups in an x86-64 patch (and the other way round: none,
    PC32 and ABS64 are every architecture's) are refused by the reader, naming both."""
    base = make_patch()
    branch = Fixup(FixupSection.TEXT, FixupType.BRANCH26, FixupBase.TEXT, 0, 0)
    a64 = replace(base, fixups=[branch], machine=Machine.AARCH64)
    assert decode_apply_body(encode_apply_body(a64)).fixups == [branch]
    with pytest.raises(PatchFormatError, match=r"type BRANCH26 is not a fix-up type of x86_64"):
        decode_apply_body(encode_apply_body(replace(a64, machine=Machine.X86_64)))
    for shared in (FixupType.PC32, FixupType.ABS64):
        fx = replace(branch, type=shared)
        for machine in Machine:
            patch = replace(base, fixups=[fx], machine=machine)
            assert decode_apply_body(encode_apply_body(patch)).fixups == [fx]
