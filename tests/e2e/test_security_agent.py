"""Attacks on the agent, performed as an unprivileged user against real processes
(docs/security.md, "The agent"). Each test builds the programs it needs (setuid,
setgid, file-capability copies of the target), runs the attack as ``nobody`` with
``setpriv``, and shows that it fails and that the process still serves.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live import wait_for_agent

from helpers import (
    AS_NOBODY,
    BIN,
    NOBODY_UID,
    NOGROUP_GID,
    ROOT,
    as_nobody,
    compile_c,
    info_json,
    render,
    run_tool,
    unique_build_id,
)
from patchbox.elf.buildid import read_build_id

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="root: builds setuid programs, runs others as nobody"
    ),
]

NOBODY, NOGROUP = NOBODY_UID, NOGROUP_GID
DAEMON = 1
PATCHBOX = str(BIN / "patchbox")


def as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def nobody_run(*argv: object) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of ``argv`` as nobody (no stdin), whatever its status."""
    return as_nobody(*argv, check=False)


@pytest.fixture(scope="module", autouse=True)
def nobody_can_run_patchbox() -> None:
    """The attacker's tool is the product's own client: nobody must be able to run it."""
    proc = nobody_run(PATCHBOX, "--version")
    if proc.returncode != 0:
        pytest.skip(f"nobody cannot run {PATCHBOX} here: {proc.stderr.strip()[-300:]}")


@pytest.fixture()
def place() -> Iterator[Callable[..., Path]]:
    """Returns a function making a directory under /tmp (whose every parent others may
    traverse) with an owner and a mode; all removed afterwards."""
    made: list[Path] = []

    def make(owner: int = 0, group: int = 0, mode: int = 0o755, parent: Path | None = None) -> Path:
        if parent is None:
            d = Path(tempfile.mkdtemp(prefix="pbx-sec-", dir="/tmp"))
            made.append(d)
        else:
            d = Path(tempfile.mkdtemp(prefix="d", dir=parent))
        os.chown(d, owner, group)
        os.chmod(d, mode)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def victim_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns the target program built with the agent (greet answers "hello")."""
    return compile_c(render(), tmp_path_factory.mktemp("victim") / "target", agent=True)


def greet_fix(exe: Path, work: Path) -> Path:
    """Returns a patch of ``exe``'s build (greet answers "patched"), readable by all."""
    obj = compile_c(render(GREETING="patched"), work / "target.o", obj=True)
    out = Path(tempfile.mkdtemp(prefix="pbx-sec-fix-", dir="/tmp")) / "greet.pbx"
    out.parent.chmod(0o755)
    run_tool("extract-patch", "--function", "greet", "--name", "greet", "-o", out, obj, exe)
    out.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def fix(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Returns a patch of the victim's build (greet answers "patched"), readable by all."""
    out = greet_fix(victim_exe, tmp_path_factory.mktemp("fix"))
    yield out
    shutil.rmtree(out.parent)


def install(
    exe: Path, where: Path, *, owner: int = 0, group: int = 0, mode: int = 0o755, caps: str = ""
) -> Path:
    """Returns a copy of ``exe`` in ``where`` with that owner, group, mode (setuid 0o4755,
    setgid 0o2755) and file capabilities (``setcap`` syntax)."""
    out = where / exe.name
    shutil.copy(exe, out)
    os.chown(out, owner, group)
    os.chmod(out, mode)
    if caps:
        proc = subprocess.run(
            ["setcap", caps, str(out)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.skip(f"setcap {caps} failed here: {proc.stderr.strip()}")
    return out


class Victim:
    """A running copy of the target started through ``argv`` (setpriv, a launcher),
    driven through stdin/stdout; ``hold`` delays its exec until :meth:`release`."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, hold: bool = False
    ) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBOX_")}
        if hold:  # the pid is known before the program runs: names can be planted
            argv = ["sh", "-c", 'read _go; exec "$@"', "sh", *argv]
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**base, **(env or {})},
        )
        stdin, stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None  # pipes
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.pid = self.proc.pid
        self.err = ""  # stderr read so far (stderr_until)
        if not hold:
            self.release()

    def release(self) -> None:
        if self.argv[0] == "sh":
            self.stdin.write("go\n")
            self.stdin.flush()
        ready = self.readline()
        assert ready == f"ready {self.pid}", ready

    def readline(self, timeout: float = 10) -> str:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        assert ready, f"victim {self.pid} did not answer (alive={self.proc.poll() is None})"
        return self.stdout.readline().rstrip("\n")

    def call(self, name: str, arg: int = 0) -> str:
        self.stdin.write(f"{name} {arg}\n")
        self.stdin.flush()
        return self.readline()

    def agent_socket(self) -> str:
        return wait_for_agent(self.pid).path

    def code(self) -> bytes:
        """Returns the bytes of the executable mappings of the victim's program."""
        exe = os.readlink(f"/proc/{self.pid}/exe")
        out = b""
        with open(f"/proc/{self.pid}/maps") as maps, open(f"/proc/{self.pid}/mem", "rb") as mem:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and "x" in parts[1] and parts[5] == exe:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    mem.seek(start)
                    out += mem.read(end - start)
        assert out
        return out

    def stderr_until(self, needle: str, timeout: float = 10) -> str:
        """Returns the victim's stderr so far once it contains ``needle`` (fails if not)."""
        fd = self.stderr.fileno()
        deadline = time.monotonic() + timeout
        while needle not in self.err:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} on stderr: {self.err!r}"
            if select.select([fd], [], [], left)[0]:
                self.err += os.read(fd, 65536).decode(errors="replace")
        return self.err

    def stop(self) -> str:
        """Stops the victim; returns its stderr. Fails if it had died."""
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait(5)
        err = self.err + os.read(self.stderr.fileno(), 1 << 20).decode(errors="replace")
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()
        assert alive, f"victim died: {err}"
        return err


@contextlib.contextmanager
def running(
    argv: list[str], env: dict[str, str] | None = None, hold: bool = False
) -> Iterator[Victim]:
    v = Victim(argv, env, hold)
    try:
        yield v
    finally:
        if v.proc.poll() is None or not v.stdin.closed:
            v.stop()


def bait(where: Path, text: str = "precious\n") -> Path:
    """Returns a root-owned file an attacker wants the agent to create, append or chmod."""
    f = where / "bait"
    f.write_text(text)
    os.chown(f, 0, 0)
    f.chmod(0o644)
    return f


def store_entry(store: Path, exe: Path, patch: Path, owner: int, group: int = 0) -> Path:
    """Returns ``patch`` placed in ``store`` as `patchbox install` lays it out, the file
    with that owner."""
    bid = read_build_id(exe)
    assert bid is not None
    d = store / bid.hex()
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{time.time_ns():020d}-greet.pbx"
    shutil.copy(patch, out)
    os.chown(out, owner, group)  # the directories stay root's
    out.chmod(0o644)
    return out


# ------------------------------------------------------------------ the environment


@pytest.mark.parametrize("kind", ["setuid-root", "setgid", "file-capability"])
def test_privileged_program_ignores_the_callers_environment(
    kind: str, victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """nobody runs a privileged copy of a program linked with the agent, with every
    PATCHBOX_* variable pointing where nobody wants: a log at a file of root's choosing,
    the socket in nobody's directory, a store of nobody's patches, debug output on. The
    agent ignores them all (AT_SECURE): no file is created or appended, no patch of
    nobody's runs, the socket is where it belongs and root reaches it."""
    euid_root = kind == "setuid-root"
    # Where the program lies: its socket goes there, so its effective user must own it.
    home = place(owner=0 if euid_root else NOBODY, group=0 if euid_root else NOGROUP)
    if kind == "setuid-root":
        exe = install(victim_exe, home, mode=0o4755)
    elif kind == "setgid":
        exe = install(victim_exe, home, owner=NOBODY, group=0, mode=0o2755)
    else:
        exe = install(victim_exe, home, owner=NOBODY, group=NOGROUP, caps="cap_net_bind_service+ep")
    loot = place(owner=NOBODY, group=NOGROUP)
    target = bait(place())
    store_entry(loot / "store", victim_exe, fix, NOBODY, NOGROUP)
    env = {
        "PATCHBOX_LOG": str(target),
        "PATCHBOX_SOCK_DIR": str(loot),
        "PATCHBOX_STORE": str(loot / "store"),
        "PATCHBOX_DEBUG": "1",
        "PATCHBOX_CLIENT_TIMEOUT_MS": "1",
    }
    with running([*AS_NOBODY, str(exe)], env=env) as v:
        ids = v.call("ids").split()
        if kind == "setuid-root":
            assert ids[2] == "0" and ids[1] == str(NOBODY), ids  # raised: real nobody, euid root
        elif kind == "setgid":
            assert ids[6] == "0" and ids[5] == str(NOGROUP), ids
        sock = v.agent_socket()
        assert os.path.dirname(sock) == str(home), sock  # not nobody's directory
        assert v.call("greet") == "hello"  # nobody's stored patch did not run
        info = info_json(v.pid)  # root reaches it; it serves
        assert info["log"] == sock + ".log"
        assert info["debug"] == "0"
        run_tool("patchbox", "apply", "-p", v.pid, fix)
        assert v.call("greet") == "patched"
        err = v.stop()
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in loot.iterdir()) == ["store"], list(loot.iterdir())
    assert "patchbox[" not in err, err  # PATCHBOX_DEBUG ignored


# ------------------------------------------------------------------ the peer rule


@pytest.mark.parametrize("kind", ["setgid", "file-capability", "not-dumpable", "setuid-to-nobody"])
def test_owner_refused_where_the_kernel_refuses_ptrace(
    kind: str, victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """A process whose effective user is nobody, which nobody still may not ptrace: a
    setgid or file-capability program, one that made itself non-dumpable (ssh-agent),
    a setuid-nobody program started by another user. nobody reaches its socket (0600,
    owned by nobody) but every request is refused with the reason; the code is byte for
    byte as it was; root may still patch it, and it keeps serving."""
    home = place(owner=NOBODY, group=NOGROUP)
    argv = list(AS_NOBODY)
    if kind == "setgid":
        exe = install(victim_exe, home, owner=NOBODY, group=0, mode=0o2755)
        reason = "may not ptrace this process"
    elif kind == "file-capability":
        exe = install(victim_exe, home, owner=NOBODY, group=NOGROUP, caps="cap_net_bind_service+ep")
        reason = "not dumpable"
    elif kind == "not-dumpable":
        exe = install(victim_exe, home, owner=NOBODY, group=NOGROUP)
        reason = "not dumpable"
    else:
        exe = install(victim_exe, home, owner=NOBODY, group=NOGROUP, mode=0o4755)
        argv = as_user(DAEMON, DAEMON)
        reason = "may not ptrace this process"
    with running([*argv, str(exe)]) as v:
        if kind == "not-dumpable":
            assert v.call("nodump") == "nodump"
        sock = v.agent_socket()
        assert os.stat(sock).st_uid == NOBODY  # nobody can connect: the agent decides
        before = v.code()
        for command in (["apply", "-s", sock, fix], ["info", "-s", sock], ["test", "-s", sock]):
            proc = nobody_run(PATCHBOX, *command)
            assert proc.returncode == 1, proc
            assert "[PERMISSION]" in proc.stderr and reason in proc.stderr, proc.stderr
        assert v.code() == before
        assert v.call("greet") == "hello"
        run_tool("patchbox", "apply", "-p", v.pid, fix)  # root: CAP_SYS_PTRACE
        assert v.call("greet") == "patched"


def test_owner_admitted_where_the_kernel_allows_ptrace(
    victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """The control: nobody's own ordinary process (dumpable, same ids) is nobody's to patch."""
    home = place(owner=NOBODY, group=NOGROUP)
    exe = install(victim_exe, home, owner=NOBODY, group=NOGROUP)
    with running([*AS_NOBODY, str(exe)]) as v:
        proc = nobody_run(PATCHBOX, "apply", "-s", v.agent_socket(), fix)
        assert proc.returncode == 0, proc.stderr
        assert v.call("greet") == "patched"


@pytest.fixture(scope="module")
def yama_exe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Returns (the target linked with an agent that reads Yama's ptrace_scope from a
    file of the test's, that file): this kernel may have no Yama."""
    d = Path(tempfile.mkdtemp(prefix="pbx-sec-yama-", dir="/tmp"))
    d.chmod(0o755)
    scope = d / "ptrace_scope"
    scope.write_text("0\n")
    scope.chmod(0o644)
    agent = tmp_path_factory.mktemp("agent-yama")
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT / "agent"),
            f"OUT={agent}",
            f'CFLAGS=-O2 -g -DSANDBOX_YAMA_PATH=\\"{scope}\\"',
        ],
        check=True,
        capture_output=True,
    )
    old = os.environ.get("PATCHBOX_AGENT_DIR")
    os.environ["PATCHBOX_AGENT_DIR"] = str(agent)
    try:
        exe = compile_c(render(), d / "target", agent=True)
    finally:
        if old is None:
            del os.environ["PATCHBOX_AGENT_DIR"]
        else:
            os.environ["PATCHBOX_AGENT_DIR"] = old
    os.chown(d, NOBODY, NOGROUP)  # the program's directory: its socket goes there
    os.chown(exe, NOBODY, NOGROUP)
    return exe, scope


def ancestor_info(exe: Path) -> subprocess.CompletedProcess[str]:
    """Returns nobody's `patchbox info` run by the very process that started ``exe``
    (its parent: a shell that starts it, then becomes the client by exec)."""
    script = (
        'fifo=$(mktemp -u); mkfifo "$fifo"; "$0" <"$fifo" >/dev/null & pid=$!; exec 3>"$fifo"; '
        f'for i in $(seq 100); do [ -S "$(dirname "$0")/sandbox-sock$pid" ] && break; sleep 0.05; done; '
        f'rm -f "$fifo"; exec {PATCHBOX} info -p $pid'
    )
    return nobody_run("sh", "-c", script, exe)


@pytest.mark.parametrize("scope", [0, 1, 2, 3])
def test_yama_ptrace_scope(scope: int, yama_exe: tuple[Path, Path]) -> None:
    """Yama's rule: scope 1 admits a same-user peer only if it is an ancestor of the
    process (or has CAP_SYS_PTRACE), 2 only CAP_SYS_PTRACE, 3 nobody at all."""
    exe, scope_file = yama_exe
    scope_file.write_text(f"{scope}\n")
    try:
        with running([*AS_NOBODY, str(exe)]) as v:
            sock = v.agent_socket()
            stranger = nobody_run(PATCHBOX, "info", "-s", sock)
            root = run_tool("patchbox", "info", "-s", sock, check=False)
            assert v.call("greet") == "hello"
        ancestor = ancestor_info(exe)
    finally:
        scope_file.write_text("0\n")
    assert (stranger.returncode == 0) == (scope == 0), stranger.stderr
    assert (ancestor.returncode == 0) == (scope <= 1), ancestor.stderr
    assert (root.returncode == 0) == (scope <= 2), root.stderr
    if scope:
        assert f"Yama ptrace_scope is {scope}" in stranger.stderr, stranger.stderr
    if scope == 3:
        assert "Yama ptrace_scope is 3" in root.stderr


# ------------------------------------------------------------------ the socket directory


@pytest.mark.parametrize("how", ["owned-by-nobody", "group-writable"])
def test_socket_directory_others_can_write_is_refused(
    how: str, victim_exe: Path, place: Callable[..., Path]
) -> None:
    """A root process told to put its socket in a directory nobody can write (the
    daemon's own user owns it, or it is group-writable and not sticky): nobody plants
    the agent's log name as a link to a root file. The agent refuses the directory and
    says why; nothing there is created or followed; it listens in the abstract namespace
    instead, where the peer rule admits root and not nobody; the program runs on."""
    if how == "owned-by-nobody":
        sock_dir = place(owner=NOBODY, group=NOGROUP)
        why = "is owned by uid 65534"
    else:
        sock_dir = place(owner=0, group=NOGROUP, mode=0o775)
        why = "mode 0775: writable by others and not sticky"
    target = bait(place())
    with running([str(victim_exe)], env={"PATCHBOX_SOCK_DIR": str(sock_dir)}, hold=True) as v:
        link = sock_dir / f"sandbox-sock{v.pid}.log"
        subprocess.run([*AS_NOBODY, "ln", "-s", str(target), str(link)], check=True)
        v.release()
        err = v.stderr_until(f"listening on @patchbox/sandbox-sock{v.pid} instead")
        assert why in err, err
        assert v.agent_socket() == f"@patchbox/sandbox-sock{v.pid}"
        assert info_json(v.pid)["log"] == "off"  # no directory of its own to log into
        refused = nobody_run(PATCHBOX, "info", "-p", v.pid)
        assert refused.returncode == 1, refused
        assert v.call("greet") == "hello"
    assert target.read_text() == "precious\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in sock_dir.iterdir()] == [link.name]


def test_daemon_binds_once_it_runs_as_the_directorys_user(
    victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """A root daemon pointed at its own user's socket directory (as /run/dnsmasq is
    dnsmasq's): refused while root (the abstract namespace instead), then the daemon
    closes every descriptor and drops to that user: its agent binds there, the directory
    being its own user's now. After that credential change the process is not
    dumpable: only root may patch it."""
    sock_dir = place(owner=NOBODY, group=NOGROUP)
    with running([str(victim_exe)], env={"PATCHBOX_SOCK_DIR": str(sock_dir)}) as v:
        v.stderr_until("instead")
        assert list(sock_dir.iterdir()) == []
        assert v.agent_socket().startswith("@")
        assert v.call("dropto", NOBODY) == "dropped"
        assert v.call("closefds") == "closed"  # as dnsmasq does: the agent binds anew
        deadline = time.monotonic() + 10
        while (sock := Path(v.agent_socket())).parent != sock_dir:
            assert time.monotonic() < deadline, sock
            time.sleep(0.05)
        assert sock.lstat().st_uid == NOBODY
        proc = nobody_run(PATCHBOX, "apply", "-s", sock, fix)
        assert proc.returncode == 1 and "not dumpable" in proc.stderr, proc.stderr
        run_tool("patchbox", "apply", "-p", v.pid, fix)
        assert v.call("greet") == "patched"


def test_worker_that_dropped_privileges_is_reached_by_root(victim_exe: Path, fix: Path) -> None:
    """A root daemon whose socket lies beside its root-owned executable drops to nobody
    and closes its descriptors (a worker after fork): nobody may not create a file
    there, so its agent listens in the abstract namespace. root reaches it and patches
    it; nobody, its user now, may not (a credential change: not dumpable)."""
    with running([str(victim_exe)]) as v:
        assert Path(v.agent_socket()).parent == victim_exe.parent
        assert v.call("dropto", NOBODY) == "dropped"
        assert v.call("closefds") == "closed"
        deadline = time.monotonic() + 10
        while not (sock := v.agent_socket()).startswith("@"):
            assert time.monotonic() < deadline, sock
            time.sleep(0.05)
        assert sock == f"@patchbox/sandbox-sock{v.pid}"
        proc = nobody_run(PATCHBOX, "apply", "-s", sock, fix)  # anyone may connect
        assert proc.returncode == 1 and "not dumpable" in proc.stderr, proc.stderr
        run_tool("patchbox", "apply", "-p", v.pid, fix)
        assert v.call("greet") == "patched"


def listener(where: Path) -> tuple[socket.socket, Path]:
    """Returns (a listening socket of root's, its path): another program's socket."""
    path = where / f"other-{secrets.token_hex(4)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    s.setblocking(False)
    return s, path


@pytest.mark.parametrize("planted", ["log-link", "log-fifo", "log-of-nobody", "socket-link"])
def test_names_planted_in_a_sticky_directory(
    planted: str, victim_exe: Path, place: Callable[..., Path]
) -> None:
    """A root process with its socket in a root-owned sticky directory everybody may
    write (/tmp-like). Before it starts, nobody plants at the names the agent will use:
    its log as a link to a root file, a FIFO, a file of nobody's; its socket as a link to
    another program's listening socket. The agent follows none of them, replaces what
    sits at its own names, binds, logs to a file of its own, and serves."""
    sock_dir = place(mode=0o1777)
    target = bait(place())
    other, other_path = listener(place())
    try:
        with running([str(victim_exe)], env={"PATCHBOX_SOCK_DIR": str(sock_dir)}, hold=True) as v:
            log = sock_dir / f"sandbox-sock{v.pid}.log"
            name = sock_dir / f"sandbox-sock{v.pid}"
            plant = {
                "log-link": ["ln", "-s", str(target), str(log)],
                "log-fifo": ["mkfifo", str(log)],
                "log-of-nobody": ["sh", "-c", f"echo mine > {log}"],
                "socket-link": ["ln", "-s", str(other_path), str(name)],
            }[planted]
            subprocess.run([*AS_NOBODY, *plant], check=True)
            v.release()
            sock = v.agent_socket()
            assert sock == str(name)
            st = os.lstat(name)
            assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o777 == 0o600
            info = info_json(v.pid)  # logs a line
            assert info["socket"] == str(name)
            st = os.lstat(log)
            assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1, st
            assert "INFO" in log.read_text()
            assert v.call("greet") == "hello"
        with pytest.raises(BlockingIOError):
            other.accept()  # nobody's link led the agent nowhere
    finally:
        other.close()
    assert target.read_text() == "precious\n"
    assert target.stat().st_mode & 0o777 == 0o644


def test_removed_socket_is_bound_again(victim_exe: Path) -> None:
    """A socket file removed under a live agent (a sweep that lost a race with a pid's
    reuse, anyone who may write the directory) is bound anew within seconds."""
    with running([str(victim_exe)]) as v:
        sock = Path(v.agent_socket())
        sock.unlink()
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "the agent did not bind again"
            time.sleep(0.05)
        assert info_json(v.pid)["socket"] == str(sock)


def test_sweep_removes_only_its_users_stale_files(
    victim_exe: Path, place: Callable[..., Path]
) -> None:
    """In a shared sticky directory, a starting root agent sweeps stale sockets of dead
    processes: its own user's only, never another user's file (nobody's, here)."""
    sock_dir = place(mode=0o1777)
    dead = [subprocess.Popen(["true"]) for _ in range(2)]
    for p in dead:
        p.wait()
    mine, theirs = (sock_dir / f"sandbox-sock{p.pid}" for p in dead)
    stale = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])"
    subprocess.run([str(BIN / "python"), "-c", stale, str(mine)], check=True)
    subprocess.run([*AS_NOBODY, str(BIN / "python"), "-c", stale, str(theirs)], check=True)
    os.utime(sock_dir, (time.time() - 60, time.time() - 60))  # quiet: swept at a start
    with running([str(victim_exe)], env={"PATCHBOX_SOCK_DIR": str(sock_dir)}) as v:
        v.agent_socket()
        deadline = time.monotonic() + 10
        while mine.exists():
            assert time.monotonic() < deadline, "root's own stale socket was not swept"
            time.sleep(0.05)
        assert theirs.exists() and theirs.lstat().st_uid == NOBODY


# ------------------------------------------------------------------ the store


def test_store_under_a_directory_of_nobody_is_refused(
    victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """A root process whose store lies below a directory nobody owns (nobody could swap
    a component for a link between a check and an open): refused, logged, not applied.
    The same store below root's directories only is applied: the control."""
    base = place()
    theirs = place(owner=NOBODY, group=NOGROUP, parent=base)
    bad = theirs / "store"
    bad.mkdir()
    store_entry(bad, victim_exe, fix, owner=0)
    good = base / "store"
    store_entry(good, victim_exe, fix, owner=0)
    with running([str(victim_exe)], env={"PATCHBOX_STORE": str(bad)}) as v:
        log = Path(v.agent_socket() + ".log")
        assert v.call("greet") == "hello"
        text = log.read_text()
        assert "STORE" in text and f"{theirs} is owned by uid 65534" in text, text
    with running([str(victim_exe)], env={"PATCHBOX_STORE": str(good)}) as v:
        assert v.call("greet") == "patched"


def test_store_component_that_is_a_link_is_refused(
    victim_exe: Path, fix: Path, place: Callable[..., Path]
) -> None:
    """The build's directory in the store is a link (to a directory of patches): the walk
    from / never follows one; refused, logged, not applied."""
    base = place()
    store = base / "store"
    real = base / "elsewhere"
    store_entry(real, victim_exe, fix, owner=0)
    bid = read_build_id(victim_exe)
    assert bid is not None
    store.mkdir()
    (store / bid.hex()).symlink_to(real / bid.hex())
    with running([str(victim_exe)], env={"PATCHBOX_STORE": str(store)}) as v:
        log = Path(v.agent_socket() + ".log")
        assert v.call("greet") == "hello"
        assert "is a symbolic link" in log.read_text()


def test_privileged_process_reads_only_roots_store_files(
    place: Callable[..., Path], tmp_path: Path
) -> None:
    """nobody's file in the default store, for a build nobody runs setgid: a process
    whose user may not change its code takes only root's files from the store. The same
    file for nobody's ordinary process of that build is applied: nobody's own to choose."""
    exe = compile_c(
        render(),
        tmp_path / "target",
        agent=True,
        extra=[unique_build_id()],  # a build no other test runs
    )
    fix = greet_fix(exe, tmp_path)
    entry = store_entry(Path("/var/lib/patchbox"), exe, fix, owner=NOBODY, group=NOGROUP)
    try:
        home = place(owner=NOBODY, group=NOGROUP)
        setgid = install(exe, home, owner=NOBODY, group=0, mode=0o2755)
        with running([*AS_NOBODY, str(setgid)]) as v:
            log = Path(v.agent_socket() + ".log")
            assert v.call("greet") == "hello"
            assert "not a regular file owned by root," in log.read_text()
        plain = install(exe, place(owner=NOBODY, group=NOGROUP), owner=NOBODY, group=NOGROUP)
        with running([*AS_NOBODY, str(plain)]) as v:
            assert v.call("greet") == "patched"
    finally:
        shutil.rmtree(entry.parent)
        shutil.rmtree(fix.parent)
