"""The three walls of issue 10, with real processes (tier 2: `-m process`).

- a program in a directory whose socket path cannot fit in sun_path;
- a program that overwrites its argv/environment block (a process title) after it
  was started with PATCHBOX_SOCK_DIR; one whose socket lies in a private mount; one in
  its own pid namespace (a container);
- a program that daemonizes (fork, setsid, fork, chdir /, close every descriptor),
  forks workers and runs other programs; a program forking while patches go in and out;
- stale sockets of killed processes in a shared directory.

Each is patched and restored through the CLI by pid (`patchbox apply/remove -p PID`)
with the change observed from outside, as the other end-to-end tests do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from live import HERE, Target, wait_for_agent

from helpers import compile_c, deep_dir, info_json, render, run_tool
from patchbox.format.layout import read_patch_file
from patchbox.procfs import get_socket_inodes, iter_unix_sockets
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import sweep_stale_sockets

pytestmark = pytest.mark.process

run = run_tool


def extract(obj: Path, exe: Path, *functions: str, name: str) -> Path:
    out = obj.parent / f"{name}.pbx"
    args = [a for f in functions for a in ("--function", f)]
    run("extract-patch", *args, "--name", name, "-o", out, obj, exe)
    return out


def bound_address(pid: int, ns_pid: int | None = None) -> str:
    """Returns the address pid's agent bound, as /proc/PID/net/unix shows it."""
    wait_for_agent(pid)
    name = f"sandbox-sock{pid if ns_pid is None else ns_pid}"
    held = get_socket_inodes(pid)
    [s] = [
        s
        for s in iter_unix_sockets(pid)
        if s.listening and s.inode in held and s.path.endswith(f"/{name}")
    ]
    return s.path


def sockets_in(directory: Path) -> set[str]:
    """Returns the names of the agent sockets (not logs) in directory."""
    return {
        p.name for p in directory.iterdir() if p.name.startswith("sandbox-sock") and p.is_socket()
    }


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture()
def no_client_sock_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI runs without PATCHBOX_SOCK_DIR: what it finds, it finds by the pid alone."""
    monkeypatch.delenv("PATCHBOX_SOCK_DIR", raising=False)


# -- deep directories -----------------------------------------------------------------


def round_trip(
    t: Target, pbx: Path, name: str, call: tuple[str] | tuple[str, int], *, before: str, after: str
) -> None:
    """Applies ``pbx`` through the CLI and removes patch ``name`` again, checking the
    answer to ``call`` before, while applied and after."""
    assert t.call(*call) == before
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call(*call) == after
    run("patchbox", "remove", "-p", t.pid, name)
    assert t.call(*call) == before


def test_deep_directory(
    tmp_path: Path, patched_obj: Callable[..., Path], no_client_sock_dir: None
) -> None:
    d = deep_dir(tmp_path / "build", 150)
    exe = compile_c(render(), d / "target", agent=True)
    t = Target(exe)
    try:
        assert len(os.fsencode(t.socket)) >= 150
        assert t.socket.is_socket()  # beside the executable, whatever the length
        addr = bound_address(t.pid)
        assert addr.startswith("/proc/self/fd/") and addr.endswith(f"/sandbox-sock{t.pid}")
        info = info_json(t.pid)
        assert info["socket"] == str(t.socket)
        assert info["log"] == f"{t.socket}.log"

        pbx = extract(patched_obj(USE_HELPER="scale(x) + 2"), exe, "use_helper", name="deep")
        round_trip(t, pbx, "deep", ("use_helper", 4), before="41", after="42")
        # The socket's long path itself (-s) works too.
        run("patchbox", "apply", "-s", t.socket, pbx)
        assert t.call("use_helper", 4) == "42"
        run("patchbox", "remove", "-s", t.socket, "deep")
        assert t.call("use_helper", 4) == "41"
        log = Path(f"{t.socket}.log").read_text()
        assert log.count("APPLY name=deep ok") == 2 and log.count("REMOVE name=deep ok") == 2
    finally:
        t.stop()
    assert "agent not started" not in t.stderr_text


def test_deep_socket_dir_and_normal_exit(
    target_exe: Path, tmp_path: Path, no_client_sock_dir: None
) -> None:
    """PATCHBOX_SOCK_DIR deep too; the socket file goes at a normal exit."""
    d = deep_dir(tmp_path / "socks", 160)
    t = Target(target_exe, env={"PATCHBOX_SOCK_DIR": str(d)})
    try:
        assert info_json(t.pid)["socket"] == str(t.socket)
        assert run("patchbox", "test", "-p", t.pid).returncode == 0
    finally:
        t.stdin.close()  # EOF: main returns, destructors run
        t.proc.wait(10)
        t.stop()
    assert not t.socket.exists()


# -- process titles and mount namespaces -------------------------------------------------


def test_environment_overwritten_by_process_title(
    target_exe: Path, tmp_path: Path, patched_obj: Callable[..., Path], no_client_sock_dir: None
) -> None:
    sock_dir = tmp_path / "elsewhere"
    sock_dir.mkdir()
    t = Target(target_exe, env={"PATCHBOX_SOCK_DIR": str(sock_dir)})
    try:
        assert t.socket.parent == sock_dir
        assert b"PATCHBOX_SOCK_DIR=" in Path(f"/proc/{t.pid}/environ").read_bytes()
        assert t.call("title", 0).startswith("titled ")
        environ = Path(f"/proc/{t.pid}/environ").read_bytes()
        assert b"PATCHBOX_SOCK_DIR" not in environ and environ.strip(b"\0") == b""
        assert Path(f"/proc/{t.pid}/cmdline").read_bytes().startswith(b"target: serving")
        assert not (target_exe.parent / f"sandbox-sock{t.pid}").exists()

        pbx = extract(patched_obj(GREETING="hello, retitled"), target_exe, "greet", name="title")
        round_trip(t, pbx, "title", ("greet",), before="hello", after="hello, retitled")
    finally:
        t.stop()


def unshare_permitted(options: list[str] | None = None) -> str | None:
    """Returns why these namespaces (default: a private mount namespace) cannot be made
    here, None if they can."""
    options = options or ["--mount", "--propagation", "private"]
    if not shutil.which("unshare"):
        return "unshare(1) not installed"
    proc = subprocess.run(
        ["unshare", *options, "true"], capture_output=True, text=True, check=False
    )
    if proc.returncode == 0:
        return None
    return f"unshare {' '.join(options)} not permitted: {proc.stderr.strip()}"


def test_private_tmpfs_over_the_program_directory(
    target_exe: Path, tmp_path: Path, patched_obj: Callable[..., Path], no_client_sock_dir: None
) -> None:
    """The program runs from a tmpfs mounted over its directory in its own mount
    namespace: its socket exists only there, and the host's client reaches it."""
    reason = unshare_permitted()
    if reason:
        pytest.skip(reason)
    d = tmp_path / "private"
    d.mkdir()
    script = 'mount -t tmpfs tmpfs "$1" && cp "$2" "$1/target" && exec "$1/target"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    t = Target(d / "target", argv=[*argv, str(d), str(target_exe)])
    try:
        assert list(d.iterdir()) == []  # the host sees the directory under the tmpfs
        assert os.readlink(f"/proc/{t.pid}/exe") == str(d / "target")
        assert bound_address(t.pid) == str(d / f"sandbox-sock{t.pid}")
        assert info_json(t.pid)["socket"] == str(d / f"sandbox-sock{t.pid}")

        pbx = extract(patched_obj(PAIR_A="40"), target_exe, "pair_a", name="ns")
        round_trip(t, pbx, "ns", ("pair_a", 2), before="3", after="42")
    finally:
        t.stop()


def test_container_pid_and_mount_namespaces(
    target_exe: Path, tmp_path: Path, patched_obj: Callable[..., Path], no_client_sock_dir: None
) -> None:
    """A container-like target: its own pid namespace (it is pid 1 there and names its
    socket sandbox-sock1) and mount namespace with its own /proc. The host patches it by
    its host pid."""
    reason = unshare_permitted(["--pid", "--fork", "--mount-proc"])
    if reason:
        pytest.skip(reason)
    exe = Path(shutil.copy(target_exe, tmp_path / "target"))
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", str(exe)]
    t = Target(exe, argv=argv)
    try:
        assert t.pid != t.proc.pid  # unshare's child
        assert bound_address(t.pid, ns_pid=1) == str(tmp_path / "sandbox-sock1")
        info = info_json(t.pid)
        assert info["pid"] == "1" and info["socket"] == str(tmp_path / "sandbox-sock1")

        pbx = extract(patched_obj(PAIR_B="7"), target_exe, "pair_b", name="container")
        round_trip(t, pbx, "container", ("pair_b", 3), before="6", after="21")
    finally:
        t.stop()


# -- daemons ---------------------------------------------------------------------------


def fill(template: str, **markers: str) -> str:
    src = (HERE / template).read_text()
    for key, value in markers.items():
        src = src.replace(f"@{key}@", value)
    return src


@pytest.fixture(scope="module")
def daemon_build(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> tuple[Path, Path]:
    """Returns (daemon executable, fixed object): answer(x) is x + 1, fixed x + 100."""
    d = tmp_path_factory.mktemp("daemon")
    exe = compile_c(fill("daemon.c", ANSWER="x + 1"), d / "daemon", agent=True)
    (d / "fix").mkdir()
    obj = compile_c(fill("daemon.c", ANSWER="x + 100"), d / "fix" / "daemon.o", obj=True)
    return exe, obj


def ask(rundir: Path, line: str) -> int:
    """Returns the daemon's answer to one request on its service socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(rundir / "service.sock"))
        s.sendall(line.encode() + b"\n")
        return int(s.makefile().readline())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("mode", ["early", "late", "reuse", "daemon3"])
def test_classic_daemon(
    mode: str, daemon_build: tuple[Path, Path], tmp_path: Path, no_client_sock_dir: None
) -> None:
    """early: the daemon closes every descriptor before its agent binds; late: after
    (the agent notices and binds anew); reuse: and then puts its own socket on the
    agent's old descriptor numbers (the agent must not accept on them); daemon3:
    glibc's daemon(), whose parent _exits and leaves its socket to the daemon's sweep."""
    built, obj = daemon_build
    bindir, rundir = tmp_path / "bin", tmp_path / "run"
    bindir.mkdir()
    rundir.mkdir()
    exe = Path(shutil.copy(built, bindir / "daemon"))
    first = subprocess.Popen([str(exe), str(rundir), mode], stdin=subprocess.DEVNULL)
    assert first.wait(10) == 0  # the first process exits once it forked
    wait_until((rundir / "daemon.pid").exists, "the daemon's pid file")
    pid = int((rundir / "daemon.pid").read_text())
    try:
        wait_for_agent(pid)
        assert ask(rundir, "answer 5") == 6  # the daemon's own socket still serves it
        # The first process's socket went with its exit (daemon3: swept by the daemon's
        # agent once it had bound), the middle one never bound.
        wait_until(lambda: sockets_in(bindir) == {f"sandbox-sock{pid}"}, "only the daemon's socket")
        assert info_json(pid)["socket"] == str(bindir / f"sandbox-sock{pid}")

        pbx = extract(obj, exe, "answer", name="daemonfix")
        run("patchbox", "apply", "-p", pid, pbx)
        assert ask(rundir, "answer 5") == 105

        # fork + exec: the child runs /bin/true and leaves no socket.
        spawned = ask(rundir, "spawn 0")
        assert spawned > 0
        time.sleep(0.5)  # past the child's bind delay, had it lived
        assert not (bindir / f"sandbox-sock{spawned}").exists()
        # A forked worker that lives: its own agent, the patch it inherited, and its
        # socket gone at its normal exit.
        worker = ask(rundir, "worker 2000")
        wait_for_agent(worker)
        listing = run("patchbox", "list", "-p", worker).stdout
        assert "daemonfix" in listing
        wait_until(lambda: not pid_alive(worker), "the worker's exit")
        wait_until(lambda: not (bindir / f"sandbox-sock{worker}").exists(), "its socket to go")

        run("patchbox", "remove", "-p", pid, "daemonfix")
        assert ask(rundir, "answer 5") == 6
        assert sockets_in(bindir) == {f"sandbox-sock{pid}"}
    finally:
        os.kill(pid, 9)


def test_apply_all_waits_for_a_worker_still_binding(
    daemon_build: tuple[Path, Path], tmp_path: Path, no_client_sock_dir: None
) -> None:
    """A forked worker's agent binds after the fork delay (sshd's connection processes
    under load are found that way): `apply --all` right after the fork waits for its
    socket and patches it with the daemon, instead of calling it unreachable."""
    built, obj = daemon_build
    bindir, rundir = tmp_path / "bin", tmp_path / "run"
    bindir.mkdir()
    rundir.mkdir()
    exe = Path(shutil.copy(built, bindir / "daemon"))
    env = {**os.environ, "PATCHBOX_FORK_DELAY_MS": "1000"}
    first = subprocess.Popen([str(exe), str(rundir), "late"], stdin=subprocess.DEVNULL, env=env)
    assert first.wait(10) == 0
    wait_until((rundir / "daemon.pid").exists, "the daemon's pid file")
    pid = int((rundir / "daemon.pid").read_text())
    worker = 0
    try:
        wait_for_agent(pid)
        pbx = extract(obj, exe, "answer", name="workerfix")
        worker = ask(rundir, "worker 8000")
        assert not (bindir / f"sandbox-sock{worker}").exists()  # not bound yet
        out = run("patchbox", "apply", "--all", "--exe", exe, "--json", pbx).stdout
        rows = {r["pid"]: r["result"] for r in json.loads(out)}
        assert rows == {pid: "applied", worker: "applied"}, out
        assert "workerfix" in run("patchbox", "list", "-p", worker).stdout
        assert ask(rundir, "answer 5") == 105
    finally:
        os.kill(pid, 9)
        if worker and pid_alive(worker):
            os.kill(worker, 9)


# -- fork during apply -----------------------------------------------------------------


JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@pytest.mark.parametrize("allocator", ["glibc", "jemalloc"])
def test_fork_during_apply_and_remove(tmp_path: Path, allocator: str) -> None:
    """A thread forks without a pause while a two-function patch is applied and removed
    in a loop: every child sees each function whole (original or redirected), both in
    the same state, and no writable code page. With jemalloc preloaded too: its own
    fork handler locks its arenas, which must not meet the agent's lock in a deadlock."""
    env = {}
    if allocator == "jemalloc":
        if not JEMALLOC.exists():
            pytest.skip(f"{JEMALLOC} not installed (Debian package libjemalloc2)")
        env["LD_PRELOAD"] = str(JEMALLOC)
    exe = compile_c(fill("forker.c", A="1", B="2"), tmp_path / "forker", agent=True)
    (tmp_path / "fix").mkdir()
    obj = compile_c(fill("forker.c", A="1000", B="3"), tmp_path / "fix" / "forker.o", obj=True)
    pbx = extract(obj, exe, "fa", "fb", name="pair")
    body = read_patch_file(pbx).body
    t = Target(exe, env=env)
    try:
        assert (allocator == "jemalloc") == ("jemalloc" in Path(f"/proc/{t.pid}/maps").read_text())
        assert t.call("call", 5) == "6 10"
        assert t.call("start", 0) == "started"
        cycles = 0
        deadline = time.monotonic() + 6
        with Client(pid=t.pid) as c:
            while time.monotonic() < deadline or cycles < 50:
                c.apply(body)
                c.remove("pair")
                cycles += 1
            c.apply(body)
        tally = dict(kv.split("=") for kv in t.call("stop", 0).split())
        counts = {k: int(v) for k, v in tally.items()}
        assert t.call("call", 5) == "1005 15"
        run("patchbox", "remove", "-p", t.pid, "pair")
        assert t.call("call", 5) == "6 10"
    finally:
        t.stop()
    bad = {k: v for k, v in counts.items() if k not in ("forks", "original", "redirected") and v}
    assert not bad, f"children saw half states: {counts} ({cycles} cycles)"
    assert counts["forks"] > 100 and counts["original"] > 0 and counts["redirected"] > 0, counts
    # Thousands of children, each gone before its agent's bind delay: no socket left
    # but the (killed) target's own.
    assert sockets_in(tmp_path) <= {f"sandbox-sock{t.pid}"}


# -- stale sockets ----------------------------------------------------------------------


def test_stale_sockets_swept(target_exe: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {"PATCHBOX_SOCK_DIR": str(shared)}
    live = Target(target_exe, env=env)
    dead = [Target(target_exe, env=env) for _ in range(3)]
    # Each agent sweeps once, on its thread, before it first serves: an answered INFO
    # means that sweep is done (under load it could otherwise run after an earlier one
    # of these was killed, and remove its socket before the check below).
    for t in dead:
        info_json(t.pid)
    for t in dead:
        t.stop()  # SIGKILL: no destructor, the socket file stays; reaped
    (shared / f"sandbox-sock{dead[0].pid}.log").write_text("a log stays\n")
    # A dead pid's name on which something listens: never removed.
    nobody = next(n for n in range(dead[1].pid + 100000, 1 << 22) if not pid_alive(n))
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(shared / f"sandbox-sock{nobody}"))
    holder.listen(1)
    try:
        assert {f"sandbox-sock{t.pid}" for t in dead} <= sockets_in(shared)
        # Unchanged for a while (an agent binding into a directory that changed in the
        # last 2 s, one of a burst of starts, does not sweep it: no quadratic storm).
        os.utime(shared, (time.time() - 60, time.time() - 60))
        fresh = Target(target_exe, env=env)  # its agent sweeps after it has bound
        try:
            wait_until(
                lambda: not {f"sandbox-sock{t.pid}" for t in dead} & sockets_in(shared),
                "the next agent to remove the dead ones' sockets",
            )
            assert sockets_in(shared) == {
                f"sandbox-sock{live.pid}",
                f"sandbox-sock{fresh.pid}",
                f"sandbox-sock{nobody}",
            }
            assert (shared / f"sandbox-sock{dead[0].pid}.log").exists()
            assert run("patchbox", "test", "-p", live.pid).returncode == 0
        finally:
            fresh.stop()
        live.stop()
        # Both killed now: the client's sweep removes them, nothing else.
        removed = sweep_stale_sockets(shared)
        # Their sockets, and fresh's log, which no request wrote to (live's has a line).
        assert sorted(p.name for p in removed) == sorted(
            [f"sandbox-sock{live.pid}", f"sandbox-sock{fresh.pid}", f"sandbox-sock{fresh.pid}.log"]
        )
        assert (shared / f"sandbox-sock{live.pid}.log").stat().st_size > 0
        assert sockets_in(shared) == {f"sandbox-sock{nobody}"}
    finally:
        holder.close()
        if live.alive():
            live.stop()
