"""Unit tests of socket discovery (protocol/discovery.py): /proc/net/unix parsing, the
rules that pick a pid's socket, connecting to long paths, the stale-socket sweep.

Sockets here are made by this test process itself (a listening socket named like an
agent's), never a real agent: the agent's side is tested in tests/e2e/test_walls.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import deep_dir, nobody_dir, nobody_python
from patchbox.errors import ConnectError
from patchbox.procfs import get_ns_pid, get_socket_inodes, parse_proc_net_unix
from patchbox.protocol import discovery
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import (
    SUN_PATH_MAX,
    SweepRefused,
    connect_path_for,
    connect_unix,
    discover,
    probe_socket,
    sweep_stale_sockets,
)

SAMPLE = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 2152927 /proc/self/fd/992/sandbox-sock29313
0000000000000000: 00000002 00000000 00010000 0001 01 31 /run/dir with space/sandbox-sock7
0000000000000000: 00000003 00000000 00000000 0001 03 32 /run/dir/sandbox-sock8
0000000000000000: 00000002 00000000 00010000 0002 01 33 /run/dgram/sandbox-sock9
0000000000000000: 00000002 00000000 00010000 0001 01 34 @abstract-name
0000000000000000: 00000003 00000000 00000000 0001 03 35
garbage line
"""


def test_parse_proc_net_unix() -> None:
    socks = parse_proc_net_unix(SAMPLE)
    assert [s.inode for s in socks] == [2152927, 31, 32, 33, 34, 35]
    assert socks[0].path == "/proc/self/fd/992/sandbox-sock29313"
    assert socks[0].listening and socks[0].type == 1
    assert socks[1].path == "/run/dir with space/sandbox-sock7"  # the rest of the line
    assert not socks[2].listening and socks[2].state == 3  # a connected stream
    assert socks[3].type == 2  # datagram
    assert socks[4].path == "@abstract-name"
    assert socks[5].path == ""  # unnamed


def test_parse_real_proc_net_unix_finds_our_listener(tmp_path: Path) -> None:
    path = tmp_path / "listener"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        inode = os.fstat(s.fileno()).st_ino
        [mine] = [
            x for x in parse_proc_net_unix(Path("/proc/net/unix").read_text()) if x.inode == inode
        ]
        assert mine.path == str(path) and mine.listening
        assert inode in get_socket_inodes(os.getpid())


def test_connect_path_rules(tmp_path: Path) -> None:
    pid = os.getpid()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        bound = f"/proc/self/fd/{fd}/sandbox-sock{pid}"
        assert connect_path_for(pid, bound, True) == (
            f"/proc/{pid}/fd/{fd}/sandbox-sock{pid}",
            f"{tmp_path}/sandbox-sock{pid}",  # the directory the descriptor names
        )
    finally:
        os.close(fd)
    assert connect_path_for(pid, "/run/x/sandbox-sock1", True) == (
        f"/proc/{pid}/root/run/x/sandbox-sock1",
        "/run/x/sandbox-sock1",
    )
    assert connect_path_for(pid, "/run/x/sandbox-sock1", False) == (
        "/run/x/sandbox-sock1",
        "/run/x/sandbox-sock1",
    )
    assert (
        connect_path_for(pid, "rel/sandbox-sock1", True)[0] == f"/proc/{pid}/cwd/rel/sandbox-sock1"
    )


def test_ns_pid_of_this_process() -> None:
    assert get_ns_pid(os.getpid()) == os.getpid()


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A listening socket named like this process's agent socket, in a deep directory:
    bound through an O_PATH descriptor, as the agent binds such a path."""
    d = deep_dir(tmp_path)
    path = d / f"sandbox-sock{os.getpid()}"
    assert len(os.fsencode(path)) > SUN_PATH_MAX
    s = socket.socket(socket.AF_UNIX)
    dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    s.bind(f"/proc/self/fd/{dirfd}/{path.name}")
    s.listen(4)
    yield s, path
    s.close()
    os.close(dirfd)


def test_discover_finds_a_deep_socket_in_proc(
    listener: tuple[socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _s, path = listener
    monkeypatch.setenv("PATCHBOX_SOCK_DIR", "/nonexistent")  # never used when /proc finds it
    found = discover(os.getpid())
    [c] = found.candidates
    assert c.source == f"/proc/{os.getpid()}/net/unix"
    assert c.path == str(path)
    assert c.connect_path.startswith(f"/proc/{os.getpid()}/fd/")
    with socket.socket(socket.AF_UNIX) as conn:
        connect_unix(conn, c.connect_path)


def test_connect_unix_long_path(listener: tuple[socket.socket, Path]) -> None:
    _s, path = listener
    with socket.socket(socket.AF_UNIX) as conn:
        connect_unix(conn, path)  # longer than sun_path: through the directory's fd
    with pytest.raises(FileNotFoundError):
        connect_unix(socket.socket(socket.AF_UNIX), path.with_name("sandbox-sock1"))


def test_client_long_socket_path(listener: tuple[socket.socket, Path]) -> None:
    s, path = listener
    c = Client(path, timeout=2)
    c.connect()
    s.accept()[0].close()
    c.close()


def test_bound_but_not_listening_is_not_a_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PATCHBOX_SOCK_DIR", raising=False)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / f"sandbox-sock{os.getpid()}"))  # stale: nobody listens
        found = discover(os.getpid())
    assert all(not c.source.startswith("/proc/") for c in found.candidates)
    assert f"no sandbox-sock{os.getpid()} listening in /proc/{os.getpid()}/net/unix" in found.notes


def test_a_socket_held_by_another_process_is_not_ours(tmp_path: Path) -> None:
    """The name matches our pid, but another process holds it: /proc/net/unix lists every
    socket of the network namespace, so the inode rule must reject it."""
    path = tmp_path / f"sandbox-sock{os.getpid()}"
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('up', flush=True); time.sleep(30)\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert other.stdout is not None  # a pipe
    try:
        assert other.stdout.readline().strip() == "up"
        found = discover(os.getpid(), environ={})
        assert all(not c.source.startswith("/proc/") for c in found.candidates)
        assert f"sandbox-sock{os.getpid()} in /proc/{os.getpid()}/net/unix is not held" in " ".join(
            found.notes
        )
    finally:
        other.kill()
        other.wait()
        other.stdout.close()


def test_fallbacks_without_proc_entry(tmp_path: Path) -> None:
    pid = os.getpid()
    exe_dir = os.path.dirname(os.readlink(f"/proc/{pid}/exe"))
    found = discover(pid, environ={"PATCHBOX_SOCK_DIR": str(tmp_path)})
    assert [(c.path, c.source) for c in found.candidates] == [
        (f"{tmp_path}/sandbox-sock{pid}", "PATCHBOX_SOCK_DIR"),
        (f"{exe_dir}/sandbox-sock{pid}", "the executable's directory"),
    ]
    assert found.candidates[1].connect_path == f"/proc/{pid}/root{exe_dir}/sandbox-sock{pid}"
    assert [c.source for c in discover(pid, environ={}).candidates] == [
        "the executable's directory"
    ]


def test_no_such_process() -> None:
    with pytest.raises(ConnectError, match="no process with pid 4194303"):
        discover(4194303)
    with pytest.raises(ConnectError, match="invalid pid"):
        discover(0)


def test_client_error_names_pid_and_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHBOX_SOCK_DIR", "/nonexistent-dir")
    pid = os.getpid()
    with pytest.raises(ConnectError) as err:
        Client(pid=pid).connect()
    text = str(err.value)
    assert text.startswith(f"no agent socket for pid {pid}: ")
    assert f"/nonexistent-dir/sandbox-sock{pid} (PATCHBOX_SOCK_DIR)" in text
    assert "(the executable's directory)" in text


# -- the stale-socket sweep ---------------------------------------------------------------


def dead_pid() -> int:
    """Returns the pid of a process that existed and is gone (reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # closed at once: the file stays, nobody listens


def test_sweep_removes_only_stale_sockets(tmp_path: Path) -> None:
    gone = dead_pid()
    stale = tmp_path / f"sandbox-sock{gone}"
    stale_socket(stale)
    (tmp_path / f"sandbox-sock{gone}.log").write_text("log stays\n")
    # A live process's stale-looking file: its pid exists, so it stays.
    alive = tmp_path / f"sandbox-sock{os.getpid()}"
    stale_socket(alive)
    # A dead pid's name, but something listens on it: it stays.
    gone2 = dead_pid()
    listening = tmp_path / f"sandbox-sock{gone2}"
    keep = socket.socket(socket.AF_UNIX)
    keep.bind(str(listening))
    keep.listen(1)
    # Not a socket: it stays.
    gone3 = dead_pid()
    (tmp_path / f"sandbox-sock{gone3}").write_text("not a socket\n")
    (tmp_path / "other-file").write_text("")
    try:
        assert sweep_stale_sockets(tmp_path) == [stale]
    finally:
        keep.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f"sandbox-sock{gone}.log",
            alive.name,
            listening.name,
            f"sandbox-sock{gone3}",
            "other-file",
        ]
    )


def test_sweep_deep_directory_and_limit(tmp_path: Path) -> None:
    d = deep_dir(tmp_path)
    dead = [dead_pid() for _ in range(3)]
    dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        for pid in dead:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(f"/proc/self/fd/{dirfd}/sandbox-sock{pid}")
    finally:
        os.close(dirfd)
    assert sweep_stale_sockets(d, limit=0) == []
    assert sorted(sweep_stale_sockets(d)) == sorted(d / f"sandbox-sock{pid}" for pid in dead)
    assert list(d.iterdir()) == []


def test_probe_socket(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    stale_socket(stale)
    assert probe_socket(stale) is False
    assert probe_socket(tmp_path / "missing") is None
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "live"))
        s.listen(0)
        assert probe_socket(tmp_path / "live") is True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to look at a process as another user")
def test_another_users_process(listener: tuple[socket.socket, Path]) -> None:
    """As uid 65534, /proc/PID/fd and /proc/PID/exe of a root process are closed: the
    error says so and how to get in, not "is the program linked"."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # no exec: the child only calls the client and reports
        text = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            Client(pid=os.getppid()).connect()
        except BaseException as err:  # anything, SystemExit included: reported to the parent
            text = str(err)
        finally:
            os.write(w, text.encode())
            os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    assert text.startswith(f"no agent socket for pid {os.getpid()}: "), text
    assert "not readable (Permission denied)" in text
    assert text.endswith("run as root or as the process's user, or pass -s SOCKET"), text


# -- the sweep under attack (docs/security.md) ---------------------------------------------


def test_sweep_keeps_an_entry_replaced_after_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the probe and the removal, the name gets a new socket (a new process of
    that pid binding its own): the removal is by what was tested, so it stays."""
    gone = dead_pid()
    name = tmp_path / f"sandbox-sock{gone}"
    stale_socket(name)
    fresh = socket.socket(socket.AF_UNIX)
    real_probe = discovery.probe_socket

    def probe_then_replace(path: str) -> bool | None:
        answer = real_probe(path)
        name.unlink()
        fresh.bind(str(name))  # another inode under the same name, listening
        fresh.listen(1)
        return answer

    monkeypatch.setattr(discovery, "probe_socket", probe_then_replace)
    try:
        assert sweep_stale_sockets(tmp_path) == []
        assert name.is_socket() and probe_socket(name) is True
    finally:
        fresh.close()


def test_probe_is_by_inode_never_through_a_link(tmp_path: Path) -> None:
    """The liveness probe connects to the inode that was stat'ed, through an O_PATH
    descriptor: a link (or another file) under the name is never connected to."""
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live"))
    live.listen(1)
    live.setblocking(False)
    stale_socket(tmp_path / "stale")
    (tmp_path / "link").symlink_to(tmp_path / "live")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = os.stat("stale", dir_fd=fd, follow_symlinks=False)
        assert discovery._probe_entry(fd, "stale", seen) is False
        assert discovery._probe_entry(fd, "live", seen) is None  # not the inode stat'ed
        link = os.stat("link", dir_fd=fd, follow_symlinks=False)
        assert discovery._probe_entry(fd, "link", link) is None
        with pytest.raises(BlockingIOError):
            live.accept()  # nothing ever connected to it
    finally:
        os.close(fd)
        live.close()


NOBODY_STALE_SOCKET = (
    "import socket, sys\ns = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()\n"
)


def test_sweep_refuses_a_directory_others_can_write(world_dir: Path) -> None:
    """Not sticky and writable by others: anyone could swap an entry between the checks
    and the removal, so nothing is removed there, not even a genuine stale socket."""
    shared = world_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    stale = shared / f"sandbox-sock{dead_pid()}"
    nobody_python(NOBODY_STALE_SOCKET, stale)
    with pytest.raises(
        SweepRefused,
        match=r"not sweeping .*shared: writable by others and not sticky \(owner uid 0, mode 0777\)",
    ):
        sweep_stale_sockets(shared)
    assert stale.is_socket()


def test_sweep_in_a_sticky_directory_takes_only_its_own(world_dir: Path) -> None:
    """In a /tmp-like directory only the sweeper's own stale sockets go: nobody's stays
    (nobody could replace it by anything between the checks and the removal)."""
    shared = world_dir / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / f"sandbox-sock{dead_pid()}"
    nobody_python(NOBODY_STALE_SOCKET, theirs)
    mine = shared / f"sandbox-sock{dead_pid()}"
    stale_socket(mine)
    assert sweep_stale_sockets(shared) == [mine]
    assert theirs.is_socket()


def test_sweep_follows_no_link_nobody_planted(world_dir: Path) -> None:
    """nobody owns a socket directory root sweeps and plants sandbox-sock<dead> links to
    root's files (a stale socket, an empty log, a listening socket) and one genuine
    stale socket of its own: only that one goes; root's files stay and nothing
    connected to root's listener."""
    sockdir = nobody_dir(world_dir, "sock")
    rootdir = world_dir / "root"
    rootdir.mkdir(mode=0o700)
    stale_socket(rootdir / "victim.sock")
    (rootdir / "victim.log").write_text("")
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(rootdir / "live.sock"))
    live.listen(1)
    live.setblocking(False)
    d1, d2, d3 = dead_pid(), dead_pid(), dead_pid()
    links = {
        f"sandbox-sock{d1}": rootdir / "victim.sock",
        f"sandbox-sock{d1}.log": rootdir / "victim.log",
        f"sandbox-sock{d2}": rootdir / "live.sock",
    }
    nobody_python(
        "import os, sys\n"
        "for name, to in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    os.symlink(to, os.path.join(sys.argv[1], name))\n",
        sockdir,
        *[x for kv in links.items() for x in kv],
    )
    nobody_python(NOBODY_STALE_SOCKET, sockdir / f"sandbox-sock{d3}")
    try:
        assert sweep_stale_sockets(sockdir) == [sockdir / f"sandbox-sock{d3}"]
        assert (rootdir / "victim.sock").is_socket() and (rootdir / "victim.log").is_file()
        assert all((sockdir / name).is_symlink() for name in links)
        with pytest.raises(BlockingIOError):
            live.accept()
    finally:
        live.close()
