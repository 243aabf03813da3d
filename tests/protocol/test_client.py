"""Unit tests of the wire client: framing, reply parsing, errors, policy checks.

The agent here is a fake server thread on a Unix socket in tmp (parsers only; tests that
patch real processes live elsewhere).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from patchbox import policy
from patchbox import wire as C
from patchbox.cli.main import cli
from patchbox.errors import AgentError, ConnectError, ProtocolError
from patchbox.format.codec import Reader, Writer
from patchbox.format.layout import encode_apply_body, save_patch
from patchbox.format.model import Function, Patch
from patchbox.protocol.client import FRAME, Client, decode_header, encode_frame
from patchbox.protocol.results import AppliedPatch, PatchFunction
from patchbox.wire import ErrorCode, Msg

# A handler gets (type, seq, payload) of one request and returns the raw bytes to send
# back (or None to close the connection without replying).
Handler = Callable[[int, int, bytes], bytes | None]


def frame(
    msg_type: int,
    seq: int,
    payload: bytes,
    *,
    magic: int = C.MAGIC,
    version: int = C.VERSION,
    length: int | None = None,
) -> bytes:
    """Returns a raw reply frame (fields overridable to build bad ones)."""
    n = len(payload) if length is None else length
    return FRAME.pack(magic, version, msg_type, seq, n) + payload


def ok(*fields: bytes) -> bytes:
    """Returns an OK reply payload followed by ``fields``."""
    return struct.pack("<i", 0) + b"".join(fields)


def err(code: int, message: str) -> bytes:
    """Returns an error reply payload."""
    return bytes(Writer().i32(code).str(message))


def reply_to(payload: bytes) -> Handler:
    """Returns a handler answering every request with ``payload`` in a proper frame."""
    return lambda t, s, _p: frame(t | C.REPLY_BIT, s, payload)


class FakeAgent:
    """Serves one connection on a Unix socket at ``path`` with ``handler``; records requests."""

    def __init__(self, path: Path, handler: Handler, once: bool = False) -> None:
        self.path = path
        self.handler = handler
        self.once = once  # close the connection after the first reply
        self.requests: list[tuple[int, int, bytes]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                self._loop(conn)
            except OSError:  # the client hung up first
                pass

    def _loop(self, conn: socket.socket) -> None:
        while True:
            header = self._recv(conn, C.HEADER_SIZE)
            if header is None:
                return
            _magic, _ver, msg_type, seq, length = FRAME.unpack(header)
            payload = self._recv(conn, length) or b""
            self.requests.append((msg_type, seq, payload))
            out = self.handler(msg_type, seq, payload)
            if out is None:
                return
            conn.sendall(out)
            if self.once:
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    """Returns a function starting a FakeAgent at tmp/sock with a handler."""
    agents: list[FakeAgent] = []

    def start(handler: Handler, name: str = "sock", once: bool = False) -> FakeAgent:
        agent = FakeAgent(tmp_path / name, handler, once)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


def client(agent: FakeAgent, timeout: float = 5.0) -> Client:
    return Client(agent.path, timeout=timeout)


# -- framing ----------------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    data = encode_frame(Msg.REMOVE, 7, b"abc")
    assert data[:4] == b"PBX1"
    assert FRAME.unpack(data[:16]) == (C.MAGIC, 1, Msg.REMOVE, 7, 3)
    assert data[16:] == b"abc"


def test_encode_frame_refuses_oversized_payload() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(Msg.APPLY, 1, bytes(C.MAX_PAYLOAD + 1))


@pytest.mark.parametrize(
    "header, match",
    [
        (frame(0x81, 1, b"", magic=0x12345678), "bad magic"),
        (frame(0x81, 1, b"", version=2), "protocol version 2"),
        (frame(0x81, 1, b"", length=C.MAX_PAYLOAD + 1), "exceeds"),
        (b"PBX1", "header is 4 bytes"),
    ],
)
def test_decode_header_rejects(header: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_header(header)


# -- good replies ---------------------------------------------------------------------------


def test_info(serve: Callable[..., FakeAgent]) -> None:
    facts = {"pid": "42", "build_id": "ab" * 20, "exe": "/bin/x"}
    agent = serve(reply_to(ok(bytes(Writer().kv(facts)))))
    with client(agent) as c:
        assert c.info() == facts
    assert agent.requests == [(Msg.INFO, 1, b"")]


def list_payload(patches: list[AppliedPatch]) -> bytes:
    w = Writer().u32(len(patches))
    for p in patches:
        w.str(p.name).u32(p.id).u64(p.applied_at).u64(p.text_addr).u32(p.text_size)
        w.u64(p.data_addr).u32(p.data_size).u16(len(p.functions))
        for f in p.functions:
            w.str(f.symbol).u64(f.target).u64(f.new).u32(f.new_size)
        w.str(p.object).u64(p.hold_ns).u8(p.state)
    return ok(bytes(w))


LISTED = [
    AppliedPatch(
        "fix-a",
        1,
        1_700_000_000_000_000_000,
        0x7F0000001000,
        64,
        0x7F0000100000,
        8,
        [PatchFunction("compute", 0x555555555139, 0x7F0000001006, 14)],
    ),
    AppliedPatch(
        "fix-b",
        2,
        1_700_000_001_000_000_000,
        0x7F0000001040,
        128,
        0,
        0,
        [
            PatchFunction("compute", 0x555555555139, 0x7F0000001046, 20),
            PatchFunction("other", 0x555555555200, 0x7F0000001066, 9),
        ],
    ),
]


def test_list(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(list_payload(LISTED)))
    with client(agent) as c:
        assert c.list() == LISTED
        assert c.list() == LISTED  # same connection, next seq
    assert [seq for _t, seq, _p in agent.requests] == [1, 2]


def test_list_empty(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(ok(struct.pack("<I", 0))))
    with client(agent) as c:
        assert c.list() == []


def test_apply_sends_body_unchanged(serve: Callable[..., FakeAgent]) -> None:
    body = encode_apply_body(make_patch())
    agent = serve(reply_to(ok(struct.pack("<IQQQ", 3, 0x7F0000002000, 0x7F0000200000, 1234))))
    with client(agent) as c:
        result = c.apply(body)
    assert (result.id, result.text_addr, result.data_addr, result.elapsed_ns) == (
        3,
        0x7F0000002000,
        0x7F0000200000,
        1234,
    )
    assert agent.requests == [(Msg.APPLY, 1, body)]


def test_remove_and_debug_payloads(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(
        lambda t, s, _p: frame(
            t | C.REPLY_BIT, s, ok(struct.pack("<QB", 77, 0) if t == Msg.REMOVE else b"")
        )
    )
    with client(agent) as c:
        removed = c.remove("fix-a")
        assert (removed.elapsed_ns, removed.written) == (77, True)
        c.debug(True)
        c.debug(False)
    assert agent.requests == [
        (Msg.REMOVE, 1, b"\x05\x00fix-a"),
        (Msg.DEBUG, 2, b"\x01"),
        (Msg.DEBUG, 3, b"\x00"),
    ]


@pytest.mark.parametrize("passed", [0, 1])
def test_test_reply(serve: Callable[..., FakeAgent], passed: int) -> None:
    agent = serve(reply_to(ok(bytes(Writer().u8(passed).str("compute 1 -> 2 -> 1")))))
    with client(agent) as c:
        ok_, detail = c.test()
    assert ok_ is bool(passed) and detail == "compute 1 -> 2 -> 1"


# -- error replies --------------------------------------------------------------------------


def test_error_reply_raises_agent_error(serve: Callable[..., FakeAgent]) -> None:
    message = (
        "bytes at target differ from the patch's expected bytes: compute+0x3 expected 53 found 55"
    )
    agent = serve(reply_to(err(ErrorCode.EXPECTED_MISMATCH, message)))
    with client(agent) as c, pytest.raises(AgentError) as info:
        c.apply(encode_apply_body(make_patch()))
    assert info.value.code == ErrorCode.EXPECTED_MISMATCH
    assert info.value.name == "EXPECTED_MISMATCH"
    assert info.value.message == message
    assert "compute+0x3" in str(info.value)


def test_unknown_error_code(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(err(999, "future error")))
    with client(agent) as c, pytest.raises(AgentError) as info:
        c.info()
    assert info.value.name == "ERROR_999"


def test_permission_reply_with_any_seq(serve: Callable[..., FakeAgent]) -> None:
    """A refused peer gets one PERMISSION reply that need not echo type or seq."""
    agent = serve(
        lambda t, s, p: frame(
            C.REPLY_BIT, 0, err(ErrorCode.PERMISSION, "peer not allowed: uid 1000")
        )
    )
    with client(agent) as c, pytest.raises(AgentError) as info:
        c.info()
    assert info.value.name == "PERMISSION"


# -- malformed replies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        (frame(0x81, 1, b"")[:10], "truncated: header has 10 of 16"),
        (frame(0x81, 1, ok(), length=12), "truncated: payload has 4 of 12"),
        (frame(0x81, 1, b"\x00\x00"), "status"),
        (frame(0x81, 1, ok(b"\x01\x00\x03\x00ab")), "truncated"),
        (frame(0x81, 1, ok(bytes(Writer().kv({})), b"junk")), "4 trailing bytes"),
        (frame(0x81, 1, err(5, "x") + b"!"), "trailing"),
        (frame(0x81, 1, b"", magic=0x0BADF00D), "bad magic"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad magic"),
        (frame(0x81, 1, b"", length=C.MAX_PAYLOAD + 1), "exceeds"),
    ],
)
def test_malformed_info_reply(serve: Callable[..., FakeAgent], raw: bytes, match: str) -> None:
    agent = serve(lambda t, s, p: raw, once=True)  # then closes: a short reply hits EOF
    with client(agent) as c, pytest.raises(ProtocolError, match=match):
        c.info()


def test_close_without_reply(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(lambda t, s, p: None)
    with client(agent) as c, pytest.raises(ProtocolError, match="without replying"):
        c.info()


def test_seq_mismatch(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(lambda t, s, p: frame(t | C.REPLY_BIT, s + 5, ok(bytes(Writer().kv({})))))
    with (
        client(agent) as c,
        pytest.raises(ProtocolError, match="seq 6 does not match request seq 1"),
    ):
        c.info()


def test_type_mismatch(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(lambda t, s, p: frame(Msg.LIST | C.REPLY_BIT, s, ok(struct.pack("<I", 0))))
    with client(agent) as c, pytest.raises(ProtocolError, match="does not answer INFO"):
        c.info()


def test_list_count_overrun(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(ok(struct.pack("<I", 0xFFFFFFFF))))
    with client(agent) as c, pytest.raises(ProtocolError, match="count 4294967295 overruns"):
        c.list()


def test_test_reply_bad_flag(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(ok(bytes(Writer().u8(7).str("")))))
    with client(agent) as c, pytest.raises(ProtocolError, match="passed = 7"):
        c.test()


# -- connecting -----------------------------------------------------------------------------


def test_timeout_waiting_for_reply(serve: Callable[..., FakeAgent]) -> None:
    gate = threading.Event()
    agent = serve(lambda t, s, p: (gate.wait(5), None)[1])
    try:
        with (
            Client(agent.path, timeout=0.2) as c,
            pytest.raises(ConnectError, match="within 0.2 s"),
        ):
            c.info()
    finally:
        gate.set()


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="no agent socket for .*config --libs"):
        Client(tmp_path / "nothing").connect()


def test_refused_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound, never listening: a stale socket file
    with pytest.raises(ConnectError, match="refuses connections"):
        Client(path).connect()


def test_no_such_pid() -> None:
    with pytest.raises(ConnectError, match="no process with pid"):
        Client(pid=2**22 + 12345).connect()


def test_client_by_pid(
    serve: Callable[..., FakeAgent], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid = os.getpid()
    agent = serve(reply_to(ok(bytes(Writer().kv({"pid": str(pid)})))), name=f"sandbox-sock{pid}")
    monkeypatch.setenv("PATCHBOX_SOCK_DIR", str(tmp_path))
    with Client(pid=pid) as c:
        assert c.info() == {"pid": str(pid)}
    assert agent.requests


# -- policy and the CLI against a fake agent -------------------------------------------------

BUILD_ID = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
TEXT = b"\x90" * 8 + b"\xb8\x2a\x00\x00\x00\xc3"


def make_patch(name: str = "fix-c", symbol: str = "compute", target: int = 0x1139) -> Patch:
    return Patch(
        name=name,
        build_id=BUILD_ID,
        text=TEXT,
        functions=[Function(symbol, target, 6, len(TEXT) - 6, b"\x90" * 8)],
    )


class StatefulAgent:
    """A handler answering INFO/LIST/APPLY/REMOVE like an agent with ``applied`` patches."""

    def __init__(self, applied: list[AppliedPatch], build_id: str = BUILD_ID.hex()) -> None:
        self.applied = list(applied)
        self.info = {
            "pid": "4242",
            "exe": "/srv/app",
            "build_id": build_id,
            "load_bias": "0x555555554000",
        }

    def __call__(self, t: int, s: int, p: bytes) -> bytes:
        if t == Msg.INFO:
            payload = ok(bytes(Writer().kv(self.info)))
        elif t == Msg.LIST:
            payload = list_payload(self.applied)
        elif t == Msg.APPLY:
            r = Reader(p)
            name = r.str("name")
            self.applied.append(AppliedPatch(name, len(self.applied) + 1, 0, 0x7F00, 64, 0, 0, []))
            payload = ok(struct.pack("<IQQQ", len(self.applied), 0x7F0000003000, 0, 5000))
        elif t == Msg.REMOVE:
            name = Reader(p).str("name")
            self.applied = [a for a in self.applied if a.name != name]
            payload = ok(struct.pack("<QB", 4000, 0))
        else:
            payload = err(ErrorCode.UNKNOWN_MESSAGE, "unknown message type")
        return frame(t | C.REPLY_BIT, s, payload)


def run_cli(*args: str) -> Result:
    return CliRunner(mix_stderr=False).invoke(cli, list(args), catch_exceptions=False)


def test_cli_apply(serve: Callable[..., FakeAgent], tmp_path: Path) -> None:
    patch_file = tmp_path / "fix.pbx"
    save_patch(make_patch(), patch_file)
    state = StatefulAgent(LISTED)
    agent = serve(state)
    result = run_cli("apply", "-s", str(agent.path), str(patch_file))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "applied fix-c (id 3) to pid 4242: compute\n"
    assert agent.requests[-1] == (Msg.APPLY, 3, encode_apply_body(make_patch()))


def test_cli_apply_build_id_mismatch(serve: Callable[..., FakeAgent], tmp_path: Path) -> None:
    patch_file = tmp_path / "fix.pbx"
    save_patch(make_patch(), patch_file)
    agent = serve(StatefulAgent([], build_id="ff" * 20))
    result = run_cli("apply", "-s", str(agent.path), str(patch_file))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert BUILD_ID.hex() in result.stderr and "ff" * 20 in result.stderr
    assert all(t != Msg.APPLY for t, _s, _p in agent.requests)


def test_cli_apply_already_applied(serve: Callable[..., FakeAgent], tmp_path: Path) -> None:
    patch_file = tmp_path / "fix.pbx"
    save_patch(make_patch(name="fix-a"), patch_file)
    agent = serve(StatefulAgent(LISTED))
    result = run_cli("apply", "-s", str(agent.path), str(patch_file))
    assert result.exit_code == 1
    assert result.stderr == (
        "patchbox: error: patch fix-a is already applied in pid 4242 "
        "(remove it first: patchbox remove -p 4242 fix-a)\n"
    )


def test_cli_remove_stacked(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(StatefulAgent(LISTED))
    result = run_cli("remove", "-s", str(agent.path), "fix-a")
    assert result.exit_code == 1
    assert result.stderr == (
        "patchbox: error: cannot remove fix-a from pid 4242: patch fix-b is "
        "stacked on it (function compute); remove fix-b first\n"
    )


def test_cli_remove_and_list(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(StatefulAgent(LISTED))
    result = run_cli("remove", "-s", str(agent.path), "fix-b")
    assert (result.exit_code, result.stdout) == (0, "removed fix-b from pid 4242\n")


def test_cli_agent_error_is_one_line(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(err(ErrorCode.INTERNAL, "internal agent error: oops")))
    result = run_cli("info", "-s", str(agent.path))
    assert result.exit_code == 1
    assert (
        result.stderr == "patchbox: error: agent refused: internal agent error: oops [INTERNAL]\n"
    )


def test_cli_list_json(serve: Callable[..., FakeAgent]) -> None:
    import json

    agent = serve(reply_to(list_payload(LISTED)))
    result = run_cli("list", "--json", "-s", str(agent.path))
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [p["name"] for p in data] == ["fix-a", "fix-b"]
    assert data[1]["functions"][1] == {
        "symbol": "other",
        "target": 0x555555555200,
        "new": 0x7F0000001066,
        "new_size": 9,
    }


def test_cli_test_failure_exits_1(serve: Callable[..., FakeAgent]) -> None:
    agent = serve(reply_to(ok(bytes(Writer().u8(0).str("compute returned 1, expected 2")))))
    result = run_cli("test", "-p", "4242", "-s", str(agent.path))
    assert result.exit_code == 2  # -p and -s together: usage error
    agent.close()
    agent = serve(
        reply_to(ok(bytes(Writer().u8(0).str("compute returned 1, expected 2")))),
        name=f"sandbox-sock{os.getpid()}",
    )
    os.environ["PATCHBOX_SOCK_DIR"] = str(agent.path.parent)
    try:
        result = run_cli("test", "-p", str(os.getpid()))
    finally:
        del os.environ["PATCHBOX_SOCK_DIR"]
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"patchbox: error: self-test failed in pid {os.getpid()}: compute returned 1, expected 2\n"
    )


def test_policy_transitions() -> None:
    S, A = policy.PatchState, policy.Action
    assert policy.transition(S.BUILT, A.APPLY) is S.APPLIED
    assert policy.transition(S.APPLIED, A.REMOVE) is S.REMOVED
    assert policy.transition(S.REMOVED, A.APPLY) is S.APPLIED
    for state, action in [(S.APPLIED, A.APPLY), (S.BUILT, A.REMOVE), (S.REMOVED, A.REMOVE)]:
        with pytest.raises(policy.PolicyError):
            policy.transition(state, action)


def test_policy_stacked_above() -> None:
    assert policy.stacked_above("fix-a", LISTED) == [("fix-b", "compute")]
    assert policy.stacked_above("fix-b", LISTED) == []
    with pytest.raises(policy.PolicyError, match=r"no patch named nope .*applied: fix-a, fix-b"):
        policy.check_remove("nope", LISTED, 1)


def test_cli_info_and_list_text(serve: Callable[..., FakeAgent]) -> None:
    state = StatefulAgent(LISTED)
    agent = serve(state)
    info = run_cli("info", "-s", str(agent.path))
    assert info.exit_code == 0
    assert info.stdout.splitlines()[0] == "pid        4242"
    agent = serve(state, name="sock2")  # the fake serves one connection; one per command
    listing = run_cli("list", "-s", str(agent.path))
    assert listing.exit_code == 0, listing.stderr
    assert listing.stdout.splitlines() == [
        "fix-a  id 1  applied 2023-11-14 22:13:20 UTC  text 0x7f0000001000+64  data 0x7f0000100000+8",
        "    compute  0x555555555139 -> 0x7f0000001006 (14 bytes)",
        "fix-b  id 2  applied 2023-11-14 22:13:21 UTC  text 0x7f0000001040+128  data 0x0+0",
        "    compute  0x555555555139 -> 0x7f0000001046 (20 bytes)",
        "    other  0x555555555200 -> 0x7f0000001066 (9 bytes)",
    ]
