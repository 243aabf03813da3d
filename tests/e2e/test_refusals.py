"""The agent's own refusals, sent straight over the socket (tier 2: `-m process`; the
aarch64 instances under qemu-user: `-m aarch64`, tests/e2e/arches.py).

Each bad request must get an error naming the cause, leave every executable byte of the
target (its text and the sandbox) identical, and the agent must serve the next client.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import rawwire
from arches import on_every_arch
from live import Target, arch_of

from patchbox.extract import extract_patch
from patchbox.format.layout import encode_apply_body
from patchbox.format.model import Patch
from patchbox.wire import ErrorCode, Msg, RedirectKind

pytestmark = on_every_arch


@pytest.fixture()
def good_patch(target_exe: Path, patched_obj: Callable[..., Path]) -> Patch:
    obj = patched_obj(USE_HELPER="scale(x) + 9")
    return extract_patch(obj, target_exe, ["use_helper"], name="good")


def still_serving(target: Target) -> None:
    """Asserts the agent answers INFO and the target still computes correctly."""
    status, _ = rawwire.request(target.socket, Msg.INFO)
    assert status == 0
    assert target.call("use_helper", 4) == "41"


def refused(target: Target, body: bytes, code: ErrorCode, *words: str) -> str:
    before = target.code_snapshot()
    status, rest = rawwire.request(target.socket, Msg.APPLY, body)
    assert status == code, (ErrorCode(status).name, rawwire.error_text(rest))
    text = rawwire.error_text(rest)
    for word in words:
        assert word in text, text
    assert target.code_snapshot() == before
    still_serving(target)
    return text


def test_good_patch_applies_raw(target: Target, good_patch: Patch) -> None:
    status, rest = rawwire.request(target.socket, Msg.APPLY, encode_apply_body(good_patch))
    assert status == 0, rawwire.error_text(rest)
    assert target.call("use_helper", 4) == "49"


def test_wrong_build_id(target: Target, good_patch: Patch) -> None:
    bad = replace(good_patch, build_id=b"\x01" * 20)
    refused(target, encode_apply_body(bad), ErrorCode.BUILD_ID_MISMATCH)


def test_changed_expected_bytes(target: Target, good_patch: Patch) -> None:
    fn = good_patch.functions[0]
    expected = bytearray(fn.expected)
    expected[9] ^= 0x55
    bad = replace(good_patch, functions=[replace(fn, expected=bytes(expected))])
    refused(target, encode_apply_body(bad), ErrorCode.EXPECTED_MISMATCH, "use_helper")


def test_already_applied(target: Target, good_patch: Patch) -> None:
    body = encode_apply_body(good_patch)
    assert rawwire.request(target.socket, Msg.APPLY, body)[0] == 0
    before = target.code_snapshot()
    status, rest = rawwire.request(target.socket, Msg.APPLY, body)
    assert status == ErrorCode.ALREADY_APPLIED, rawwire.error_text(rest)
    assert target.code_snapshot() == before
    assert target.call("use_helper", 4) == "49"


def test_sandbox_too_small(target: Target, good_patch: Patch) -> None:
    size = 8 << 20  # larger than any SANDBOX_ALLOC we build with
    text = good_patch.text + b"\xcc" * size
    bad = replace(good_patch, text=text)
    refused(target, encode_apply_body(bad), ErrorCode.SANDBOX_FULL)


def test_target_outside_text(target: Target, good_patch: Patch) -> None:
    fn = good_patch.functions[0]
    bad = replace(good_patch, functions=[replace(fn, target=0x7FFF0000)])
    refused(target, encode_apply_body(bad), ErrorCode.TARGET_OUT_OF_TEXT)


def test_unknown_remove(target: Target) -> None:
    payload = struct.pack("<H", 7) + b"nothere"
    status, rest = rawwire.request(target.socket, Msg.REMOVE, payload)
    assert status == ErrorCode.NOT_APPLIED and "nothere" in rawwire.error_text(rest)
    still_serving(target)


@pytest.mark.parametrize("cut", [1, 5, 30, 60])
def test_truncated_apply_body(target: Target, good_patch: Patch, cut: int) -> None:
    body = encode_apply_body(good_patch)
    refused(target, body[:cut], ErrorCode.MALFORMED)


def test_garbage_then_next_client(target: Target) -> None:
    before = target.code_snapshot()
    with rawwire.connect(target.socket) as s:
        s.sendall(os.urandom(64))
        _type, _seq, status, _rest = rawwire.recv_reply(s)
        assert status == ErrorCode.BAD_MAGIC
    assert target.code_snapshot() == before
    still_serving(target)


def test_truncated_frame_then_hangup(target: Target) -> None:
    with rawwire.connect(target.socket) as s:
        s.sendall(rawwire.frame(Msg.APPLY, b"\x00" * 10, length=1000))
    still_serving(target)


def test_oversized_length(target: Target) -> None:
    with rawwire.connect(target.socket) as s:
        s.sendall(rawwire.frame(Msg.APPLY, length=0xFFFFFFFF))
        assert rawwire.recv_reply(s)[2] == ErrorCode.TOO_LARGE
    still_serving(target)


def test_unknown_message_keeps_connection(target: Target) -> None:
    with rawwire.connect(target.socket) as s:
        s.sendall(rawwire.frame(0x55, b"abc"))
        assert rawwire.recv_reply(s)[2] == ErrorCode.UNKNOWN_MESSAGE
        s.sendall(rawwire.frame(Msg.INFO))
        assert rawwire.recv_reply(s)[2] == 0


def test_stalled_client_does_not_block_forever(target_exe: Path) -> None:
    t = Target(target_exe, env={"PATCHBOX_CLIENT_TIMEOUT_MS": "300"})
    try:
        stalled = rawwire.connect(t.socket)
        stalled.sendall(b"PBX")  # part of a header, then nothing
        start = time.monotonic()
        status, _ = rawwire.request(t.socket, Msg.INFO)
        assert status == 0
        assert time.monotonic() - start < 5
        stalled.close()
        assert t.alive()
    finally:
        t.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_peer_with_another_uid_is_refused(
    target_exe: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="pbx-uid-"))
    sock_dir.chmod(0o711)  # reachable by uid 65534, so only SO_PEERCRED can refuse it
    target = Target(target_exe, env={"PATCHBOX_SOCK_DIR": str(sock_dir)})
    try:
        check_other_uid_refused(target)
    finally:
        target.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def check_other_uid_refused(target: Target) -> None:
    os.chmod(target.socket, 0o666)  # let the kernel connect it; SO_PEERCRED must refuse
    before = target.code_snapshot()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the client, as uid 65534 (nobody); no exec needed
        status = -1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with rawwire.connect(target.socket) as s:
                s.sendall(rawwire.frame(Msg.INFO))
                status = rawwire.recv_reply(s)[2]
        finally:
            os.write(write_end, str(status).encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    status = int(os.read(read_end, 32) or b"-2")
    os.close(read_end)
    assert status == ErrorCode.PERMISSION
    log = Path(f"{target.socket}.log").read_text()
    assert "65534" in log
    assert target.code_snapshot() == before
    still_serving(target)


def test_patch_over_bytes_another_patch_changed(target: Target, good_patch: Patch) -> None:
    """A lying client: an entry jump at the start of the padding an applied patch owns
    (x86-64: the rel32 jump it wrote there; aarch64: where a far redirect puts its veneer,
    restored by its remove), with "expected" bytes copied from memory. Accepting it would
    let the first patch's remove restore bytes under the second's jump (found by the
    fuzzer's invariant). (At the function's own address it would be a stacked patch.)"""
    assert rawwire.request(target.socket, Msg.APPLY, encode_apply_body(good_patch))[0] == 0
    assert target.call("use_helper", 4) == "49"
    fn = good_patch.functions[0]
    status, rest = rawwire.request(target.socket, Msg.INFO)
    bias = int(dict(_kv(rest))["load_bias"], 16)
    # link-time address of the padding: 6 bytes before the entry, 16 on aarch64
    padding = fn.target - arch_of(target.exe).entry.pad
    over = replace(
        good_patch,
        name="over",
        functions=[
            replace(
                fn,
                target=padding,
                kind=RedirectKind.ENTRY_JUMP,
                skip=0,
                expected=target.read(bias + padding, 16),
            )
        ],
    )
    before = target.code_snapshot()
    status, rest = rawwire.request(target.socket, Msg.APPLY, encode_apply_body(over))
    assert status == ErrorCode.OVERLAP, (ErrorCode(status).name, rawwire.error_text(rest))
    assert "good" in rawwire.error_text(rest)
    assert target.code_snapshot() == before
    assert target.call("use_helper", 4) == "49"


def _kv(rest: bytes) -> Iterator[tuple[str, str]]:
    (count,) = struct.unpack_from("<H", rest)
    pos = 2
    for _ in range(count):
        pair = []
        for _ in range(2):
            (n,) = struct.unpack_from("<H", rest, pos)
            pair.append(rest[pos + 2 : pos + 2 + n].decode())
            pos += 2 + n
        key, value = pair
        yield key, value
