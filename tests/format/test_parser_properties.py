"""Hypothesis property tests of the Python parsers: the patch file reader and the wire
reply decoders never fail with anything but their own error on hostile bytes, and
generated patches survive a write/read round trip (signed or not)."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_patch
from patchbox import wire as C
from patchbox.arch import Machine, get_arch_by_machine
from patchbox.errors import AgentError, PatchFormatError, ProtocolError
from patchbox.format.layout import (
    HEADER,
    decode_apply_body,
    encode_apply_body,
    read_patch,
    split_signature,
    with_signature,
    write_patch,
)
from patchbox.format.model import Fixup, Function, Patch
from patchbox.protocol.client import decode_header
from patchbox.protocol.replies import decode_reply
from patchbox.wire import FixupBase, FixupSection, Msg

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID_FILE = write_patch(make_patch())

NAME = st.from_regex(r"[A-Za-z0-9._+-]{1,63}", fullmatch=True)
TEXT_STR = st.text(max_size=40)


@st.composite
def patches(draw: st.DrawFn) -> Patch:
    text = draw(st.binary(min_size=8, max_size=200))
    data = draw(st.binary(max_size=64))
    functions = []
    for _ in range(draw(st.integers(1, 4))):
        off = draw(st.integers(6, len(text) - 1))
        size = draw(st.integers(0, len(text) - off))
        functions.append(
            Function(
                draw(st.text(min_size=1, max_size=30)),
                draw(st.integers(0, 2**64 - 1)),
                off,
                size,
                draw(st.binary(min_size=C.MIN_EXPECTED, max_size=C.MAX_EXPECTED)),
            )
        )
    machine = draw(st.sampled_from(list(Machine)))
    # The fix-up types of the patch's machine (another's is refused: tests/format).
    ftypes = sorted(get_arch_by_machine(int(machine)).fixup_types)
    fixups = []
    for _ in range(draw(st.integers(0, 6))):
        section = draw(st.sampled_from(list(FixupSection)))
        ftype = draw(st.sampled_from(ftypes))
        limit = (len(text) if section == FixupSection.TEXT else len(data)) - C.FIXUP_WIDTH[ftype]
        if limit < 0:
            continue
        base = draw(st.sampled_from(list(FixupBase)))
        fixups.append(
            Fixup(
                section,
                ftype,
                base,
                draw(st.integers(0, limit)),
                draw(st.integers(-(2**63), 2**63 - 1)),
                draw(st.text(min_size=1, max_size=20)) if base == FixupBase.IMPORT else "",
            )
        )
    return Patch(
        name=draw(NAME),
        build_id=draw(st.binary(min_size=1, max_size=64)),
        text=text,
        functions=functions,
        fixups=fixups,
        data=data,
        bss_size=draw(st.integers(0, 2**32 - 1)),
        meta=draw(st.dictionaries(TEXT_STR, TEXT_STR, max_size=5)),
        machine=machine,
    )


def only_format_errors(data: bytes) -> None:
    try:
        read_patch(data)
    except PatchFormatError:
        pass


@SETTINGS
@given(st.binary(max_size=400))
def test_reader_on_random_bytes(data: bytes) -> None:
    only_format_errors(data)
    only_format_errors(VALID_FILE[:56] + data)


def rehash(data: bytes) -> bytes:
    """Returns ``data`` with the header's payload length and hash made to fit its payload,
    so that mutations reach the payload decoder instead of the hash check."""
    magic, version, hsize, flags, _length, _digest = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    return (
        HEADER.pack(magic, version, hsize, flags, len(payload), hashlib.sha256(payload).digest())
        + payload
    )


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID_FILE) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(0, len(VALID_FILE)),
    st.binary(max_size=16),
    st.booleans(),
)
def test_reader_on_mutated_files(
    edits: list[tuple[int, int]], cut: int, extra: bytes, fix_hash: bool
) -> None:
    edited = bytearray(VALID_FILE)
    for pos, value in edits:
        edited[pos] = value
    data = bytes(edited[: max(cut, HEADER.size)]) + extra
    if fix_hash and len(data) >= HEADER.size:
        try:
            data = rehash(data)
        except struct.error:
            return
    only_format_errors(data)


@SETTINGS
@given(st.binary(max_size=300))
def test_apply_body_decoder_on_random_bytes(body: bytes) -> None:
    try:
        decode_apply_body(body)
    except PatchFormatError:
        pass


@SETTINGS
@given(patches())
def test_roundtrip(patch: Patch) -> None:
    data = write_patch(patch)
    assert read_patch(data) == patch
    assert decode_apply_body(encode_apply_body(patch)) == patch.__class__(
        **{**patch.__dict__, "meta": {}}
    )


@SETTINGS
@given(patches(), st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64))
def test_roundtrip_signed(patch: Patch, key_id: bytes, sig: bytes) -> None:
    data = with_signature(write_patch(patch), key_id, lambda _signed: sig)
    assert read_patch(data) == patch
    trailer = split_signature(data)
    assert trailer is not None
    assert trailer.key_id == key_id and trailer.signature == sig
    # Signing again replaces the trailer.
    assert with_signature(data, key_id, lambda _signed: sig) == data


@SETTINGS
@given(patches(), st.data())
def test_truncated_files_refused(patch: Patch, data: st.DataObject) -> None:
    raw = write_patch(patch)
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        read_patch(raw[:cut])
    except PatchFormatError:
        return
    raise AssertionError(f"a file cut at {cut} of {len(raw)} bytes was accepted")


@SETTINGS
@given(st.sampled_from(list(Msg)), st.binary(max_size=300))
def test_reply_decoder_on_garbage(msg: Msg, payload: bytes) -> None:
    try:
        decode_reply(msg, payload)
    except (ProtocolError, AgentError):
        pass


@SETTINGS
@given(st.sampled_from(list(Msg)), st.integers(-5, 40), st.binary(max_size=200))
def test_reply_decoder_with_status(msg: Msg, status: int, rest: bytes) -> None:
    """Garbage after a plausible status: AgentError only for a well-formed error reply."""
    try:
        decode_reply(msg, struct.pack("<i", status) + rest)
    except AgentError as err:
        assert status != 0 and err.code == status
    except ProtocolError:
        pass


@SETTINGS
@given(st.binary(min_size=0, max_size=32))
def test_header_decoder_on_garbage(header: bytes) -> None:
    try:
        decode_header(header)
    except ProtocolError:
        pass


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_list_reply_with_huge_counts(count: int, rest: bytes) -> None:
    """A count the payload cannot hold is refused: a decoder that accepted it must fail."""
    try:
        patches = decode_reply(Msg.LIST, struct.pack("<iI", 0, count) + rest)
    except ProtocolError:
        return
    # Accepted: then every counted entry was really there (each takes >= 50 bytes).
    assert len(patches) == count
    assert count * 50 <= len(rest)
