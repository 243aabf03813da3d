"""Faults around the agent (tier 2: `-m process`): clients killed at every step of an
apply, silent and concurrent clients, an unwritable socket directory, a full log disk,
and clients of another user (socket-file permission and SO_PEERCRED)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rawwire
from live import Target

from helpers import compile_c, info_json, render
from patchbox.extract import extract_patch
from patchbox.format.layout import encode_apply_body
from patchbox.format.model import Patch
from patchbox.protocol.client import Client
from patchbox.wire import Msg

pytestmark = pytest.mark.process

NOBODY = 65534
# A client that sends a prefix of a request, says so, then waits to be SIGKILLed.
KILLED_CLIENT = r"""
import socket, sys, time
path, data, n = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(data[:n])
print("sent", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def patches(target_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Patch]:
    d = tmp_path_factory.mktemp("faults")
    (d / "a").mkdir()
    (d / "b").mkdir()
    helper = compile_c(render(USE_HELPER="scale(x) + 9"), d / "a" / "target.o", obj=True)
    bump = compile_c(render(BUMP_STEP="100"), d / "b" / "target.o", obj=True)
    return {
        "helper": extract_patch(helper, target_exe, ["use_helper"], name="helper"),
        "bump": extract_patch(bump, target_exe, ["bump"], name="bump"),
    }


def state(target: Target) -> tuple[dict[int, bytes], bytes]:
    with Client(target.socket) as c:
        info = c.info()
    return target.code_snapshot(), target.read(int(info["data_addr"], 16), int(info["data_size"]))


def applied(target: Target) -> list[str]:
    with Client(target.socket) as c:
        return [p.name for p in c.list()]


@pytest.mark.parametrize("step", ["connect-only", "header", "half-payload", "full-payload"])
def test_client_killed_during_apply(
    target: Target, patches: dict[str, Patch], tmp_path: Path, step: str
) -> None:
    from patchbox.protocol.client import encode_frame

    frame = encode_frame(Msg.APPLY, 1, encode_apply_body(patches["helper"]))
    n = {
        "connect-only": 0,
        "header": 16,
        "half-payload": 16 + (len(frame) - 16) // 2,
        "full-payload": len(frame),
    }[step]
    frame_file = tmp_path / "frame"
    frame_file.write_bytes(frame)
    before = state(target)
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(target.socket), str(frame_file), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None  # pipes
    assert client.stdout.readline().strip() == "sent"
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    client.stdout.close()
    # The next client is served once the agent has finished with the dead one.
    names = applied(target)
    if step != "full-payload":
        assert names == []
    if names:  # fully patched: listed, the new code runs, and only the patch's bytes changed
        assert names == ["helper"]
        assert target.call("use_helper", 4) == "49"
        with Client(target.socket) as c:
            c.remove("helper")
    else:
        assert target.call("use_helper", 4) == "41"
    # After a remove (if applied), text is back; only the retired sandbox may differ.
    after = state(target)
    if not names:
        assert after == before
    assert target.call("use_helper", 4) == "41"


def test_full_payload_then_killed_is_applied_entirely(
    target: Target, patches: dict[str, Patch], tmp_path: Path
) -> None:
    """The agent has the whole request: it applies (all functions), the reply is lost.

    The client dies once the new code runs: a peer that died before the agent checked it
    is refused by design (its pid may be another's: sandbox-trust.c), so killing it at
    once made this test depend on the agent being scheduled first (seen under load)."""
    from patchbox.protocol.client import encode_frame

    frame = encode_frame(Msg.APPLY, 1, encode_apply_body(patches["helper"]))
    (tmp_path / "f").write_bytes(frame)
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_CLIENT,
            str(target.socket),
            str(tmp_path / "f"),
            str(len(frame)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None  # pipes
    assert client.stdout.readline().strip() == "sent"
    deadline = time.monotonic() + 30
    while target.call("use_helper", 4) != "49":  # the agent's thread, not this one
        assert time.monotonic() < deadline, "the complete request was never applied"
        time.sleep(0.01)
    client.kill()
    client.wait(10)
    client.stdout.close()
    assert applied(target) == ["helper"]
    assert target.call("use_helper", 4) == "49"


@pytest.mark.parametrize("prefix", [b"", b"PBX1", rawwire.frame(Msg.APPLY, length=100)])
def test_silent_client_does_not_block_others(target_exe: Path, prefix: bytes) -> None:
    """Connects (and sends nothing, a partial header, or a header without its payload)."""
    t = Target(target_exe, env={"PATCHBOX_CLIENT_TIMEOUT_MS": "300"})
    try:
        stalled = rawwire.connect(t.socket)
        stalled.sendall(prefix)
        start = time.monotonic()
        status, _ = rawwire.request(t.socket, Msg.INFO)
        assert status == 0 and time.monotonic() - start < 3
        stalled.settimeout(5)
        assert stalled.recv(1) == b""  # dropped
        stalled.close()
        assert t.alive() and t.call("use_helper", 4) == "41"
    finally:
        t.stop()


def test_two_clients_are_serialised(target: Target) -> None:
    """While one connection is open the next waits; it is served when the first closes."""
    first = rawwire.connect(target.socket)
    first.sendall(rawwire.frame(Msg.INFO))
    assert rawwire.recv_reply(first)[2] == 0
    second = rawwire.connect(target.socket)  # accepted by the kernel (backlog), not served
    second.sendall(rawwire.frame(Msg.INFO))
    second.settimeout(0.5)
    with pytest.raises(socket.timeout):
        second.recv(1)
    first.sendall(rawwire.frame(Msg.LIST, seq=2))
    assert rawwire.recv_reply(first)[1:3] == (2, 0)  # the first is still served meanwhile
    first.close()
    second.settimeout(10)
    assert rawwire.recv_reply(second)[2] == 0
    second.close()


def test_two_applies_at_once_both_succeed(target: Target, patches: dict[str, Patch]) -> None:
    results: dict[str, object] = {}

    def apply(name: str) -> None:
        try:
            with Client(target.socket) as c:
                results[name] = c.apply(encode_apply_body(patches[name]))
        except Exception as err:  # reported below
            results[name] = err

    threads = [threading.Thread(target=apply, args=(n,)) for n in ("helper", "bump")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert sorted(applied(target)) == ["bump", "helper"]
    assert target.call("use_helper", 4) == "49"
    assert target.call("bump") == "100"


def run_as_nobody(exe: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(exe)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        user=NOBODY,
        group=NOBODY,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the target as another user")
def test_socket_dir_not_writable(target_exe: Path) -> None:
    """The agent cannot create its socket: the program runs on, the reason is on stderr,
    and the agent listens in the abstract namespace instead (root reaches it there)."""
    tmp = Path(tempfile.mkdtemp(prefix="pbx-ro-"))
    try:
        tmp.chmod(0o755)
        exe = tmp / "target"
        shutil.copy(target_exe, exe)
        ro = tmp / "ro"
        ro.mkdir(mode=0o755)  # owned by root: not writable by nobody
        proc = run_as_nobody(exe, {"PATCHBOX_SOCK_DIR": str(ro)})
        assert (
            proc.stderr is not None and proc.stdin is not None and proc.stdout is not None
        )  # pipes
        assert proc.stdout.readline().startswith("ready")
        proc.stdin.write("use_helper 4\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "41"
        assert proc.poll() is None
        assert info_json(proc.pid)["socket"] == f"@patchbox/sandbox-sock{proc.pid}"
        proc.stdin.close()
        proc.wait(10)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert str(ro) in err and "Permission denied" in err, err
        assert err.count(f"listening on @patchbox/sandbox-sock{proc.pid} instead") == 1, err
        assert not list(ro.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_log_disk_full(target_exe: Path) -> None:
    """PATCHBOX_LOG=/dev/full: requests are served; the reason is on stderr, once."""
    t = Target(target_exe, env={"PATCHBOX_LOG": "/dev/full"})
    try:
        for _ in range(5):
            assert rawwire.request(t.socket, Msg.INFO)[0] == 0
        with Client(t.socket) as c:
            assert c.info()["log"] == "/dev/full"
            assert c.test().passed
        assert t.call("use_helper", 4) == "41"
    finally:
        t.stop()
    assert t.stderr_text.count("cannot write log /dev/full") == 1, t.stderr_text
    assert "No space left on device" in t.stderr_text


# -- another user ----------------------------------------------------------------------


def as_nobody(fn: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """Runs ``fn()`` (returns (int, str)) in a forked child as uid/gid 65534."""
    import json

    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        out = (-1, "child failed")
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as err:  # anything, SystemExit included: reported to the parent
            out = (-3, repr(err))
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    code, text = json.loads(data or b'[-2, "no answer"]')
    return code, text


def cli_in_child(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from patchbox.cli.main import cli

    result = CliRunner(mix_stderr=False).invoke(cli, list(args))
    return result.exit_code, result.stderr


@pytest.fixture()
def shared_target(target_exe: Path) -> Iterator[Target]:
    """A target whose socket directory other users may traverse (0711)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="pbx-uid-"))
    sock_dir.chmod(0o711)
    t = Target(target_exe, env={"PATCHBOX_SOCK_DIR": str(sock_dir)})
    yield t
    t.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_other_user_blocked_by_socket_mode(shared_target: Target) -> None:
    """Socket file 0600: connect() fails with EACCES; the CLI says so."""
    assert oct(shared_target.socket.stat().st_mode & 0o777) == "0o600"
    before = shared_target.code_snapshot()
    code, err = as_nobody(lambda: cli_in_child("info", "-s", str(shared_target.socket)))
    assert code == 1, err
    assert "permission denied connecting to" in err and str(shared_target.socket) in err
    assert "run as root or as the process's user" in err
    assert shared_target.code_snapshot() == before
    assert rawwire.request(shared_target.socket, Msg.INFO)[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_other_user_refused_by_peercred_via_cli(shared_target: Target) -> None:
    """Socket opened up (0666): SO_PEERCRED still refuses; the CLI shows the agent's reason."""
    os.chmod(shared_target.socket, 0o666)
    before = shared_target.code_snapshot()
    for command in ("info", "list", "test"):
        code, err = as_nobody(
            functools.partial(cli_in_child, command, "-s", str(shared_target.socket))
        )
        assert code == 1, err
        assert "peer not allowed" in err and "uid 65534" in err and "[PERMISSION]" in err, err
    assert shared_target.code_snapshot() == before
    assert applied(shared_target) == []
    assert rawwire.request(shared_target.socket, Msg.INFO)[0] == 0
