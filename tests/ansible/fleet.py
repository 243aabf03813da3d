"""Managed hosts on this machine, for the Ansible tier (docs/ansible.md, "The test hosts").

Each host is a set of namespaces of its own:

- a network namespace ``pbx-hN`` with its own address 10.77.0.(10+N) on a veth pair to
  a bridge in the root namespace (the controller is 10.77.0.1), and its own ``sshd``
  listening there with a host key and an authorized key made by the fixture;
- a PID namespace whose PID 1 is that ``sshd``: the modules, run by Ansible over ssh, see
  this host's processes only, with this host's pids (as on a real host), and when the
  host is stopped the kernel kills everything that ran on it;
- a mount namespace in which the host's own directories are bound over ``/var/lib/patchbox``
  (its patch store), ``/var/lib/patchbox-staging`` (where the rollout stages patches),
  ``/var/tmp`` (scratch, world-writable and sticky as on a real host) and the application
  directory (the same path on every host, as a package would install it; the agent's
  sockets live beside the program, so each host has its own).

Processes are started "on" a host with ``nsenter`` into its namespaces; the test keeps
their stdin/stdout to drive them and watch their behaviour change.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from helpers import elf_symbol

__all__ = [
    "Host",
    "HostTarget",
    "Fleet",
    "BRIDGE",
    "CONTROLLER",
    "STAGING",
    "run",
    "corrupt_padding",
]

BRIDGE = "pbx-br0"
CONTROLLER = "10.77.0.1"
PREFIX = 24
STORE = Path("/var/lib/patchbox")  # the default store, private per host
STAGING = Path("/var/lib/patchbox-staging")  # the rollout's default, private per host
SCRATCH = Path("/var/tmp")


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of a system command (no stdin)."""
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: rc {proc.returncode}: {proc.stderr}")
    return proc


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _running(pid: int) -> bool:
    """Returns whether ``pid`` exists and has not exited (a zombie holds no namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Build(TypedDict):
    """The target program (with the agent) and its patch (tests/ansible/conftest.py):
    ``exe`` where it was built (``program``) or installed on the hosts (``builds``)."""

    exe: Path
    patch: Path
    build_id: str  # hex


class LibraryBuild(TypedDict):
    """A library patch: the two programs using the library, installed on the hosts."""

    users: list[Path]
    patch: Path
    build_id: str  # hex, the library's


@dataclass
class Host:
    """One managed host: its names, address and private directories."""

    index: int
    root: Path  # its private directories (on the shared file system)
    app: Path  # the application directory's path, the same on every host
    proc: subprocess.Popen[bytes] | None = None  # unshare, in the root namespaces
    init_pid: int = 0  # the host's PID 1 (sshd) as the root namespace sees it

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def netns(self) -> str:
        return f"pbx-{self.name}"

    @property
    def address(self) -> str:
        return f"10.77.0.{10 + self.index}"

    @property
    def store(self) -> Path:
        """The directory that is /var/lib/patchbox on this host."""
        return self.root / "store"

    @property
    def staging(self) -> Path:
        """The directory that is /var/lib/patchbox-staging on this host."""
        return self.root / "staging"

    @property
    def scratch(self) -> Path:
        """The directory that is /var/tmp on this host."""
        return self.root / "tmp"

    @property
    def app_dir(self) -> Path:
        """The directory that is the application directory on this host."""
        return self.root / "app"

    def sshd_config(self, authorized_keys: Path) -> str:
        return "\n".join(
            [
                f"ListenAddress {self.address}",
                "Port 22",
                f"HostKey {self.root / 'ssh_host_ed25519_key'}",
                "PidFile none",
                f"AuthorizedKeysFile {authorized_keys}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # The fixture's files live under /tmp (world-writable, sticky).
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "MaxStartups 100",
                "LogLevel VERBOSE",
                "",
            ]
        )

    def start(self, authorized_keys: Path) -> None:
        """Starts the host: its namespaces, bind mounts and sshd (its PID 1)."""
        for d in (self.store, self.app_dir, self.staging):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.scratch.chmod(0o1777)
        key = self.root / "ssh_host_ed25519_key"
        if not key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", key)
        config = self.root / "sshd_config"
        config.write_text(self.sshd_config(authorized_keys))
        run("/usr/sbin/sshd", "-t", "-f", config)
        script = (
            "set -e\n"
            f"mount --bind {self.store} {STORE}\n"
            f"mount --bind {self.staging} {STAGING}\n"
            f"mount --bind {self.scratch} {SCRATCH}\n"
            f"mount --bind {self.app_dir} {self.app}\n"
            f"exec /usr/sbin/sshd -D -e -f {config}\n"
        )
        log = open(self.root / "host.log", "ab")  # noqa: SIM115 (kept by the child)
        self.proc = subprocess.Popen(
            # --kill-child: if unshare dies, its child (the host's PID 1) is killed, and
            # with it every process of the host's PID namespace.
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--kill-child"]
            + ["--mount", "--propagation", "private", "--mount-proc", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"{self.name} did not start: {self.log_tail()}"
            kids = _children(self.proc.pid)
            if kids and self._listening():
                self.init_pid = kids[0]
                return
            assert time.monotonic() < deadline, f"sshd of {self.name} never listened"
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.address, 22)) == 0

    def log_tail(self) -> str:
        try:
            return (self.root / "host.log").read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the host: everything in its PID namespace dies with its PID 1."""
        if self.proc is not None and self.proc.poll() is None:
            # Its PID 1 first, so that unshare (its parent) reaps it and exits.
            if self.init_pid:
                try:
                    os.kill(self.init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # --kill-child takes the host's PID 1 with it
                self.proc.wait(10)
        self.proc = None


@dataclass
class HostTarget:
    """A real target process running on a managed host, driven through stdin/stdout."""

    host: Host
    exe: Path  # the path on the host
    pid: int = 0  # its pid on the host
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    args: list[str] = field(default_factory=list)  # its arguments (the program ignores them)

    def start(self, agent: bool = True) -> HostTarget:
        """Returns self once the process answers and (``agent``) its agent listens."""
        ns = ["nsenter", "-t", str(self.host.init_pid), "-p", "-m", "-n", "--"]
        self.proc = subprocess.Popen(
            [*ns, str(self.exe), *self.args],
            env={**os.environ, **self.env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        ready = self._readline()
        assert ready.startswith("ready "), ready
        self.pid = int(ready.split()[1])
        if not agent:
            return self
        sock = self.host.app_dir / f"sandbox-sock{self.pid}"
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, f"agent socket {sock} never appeared"
            time.sleep(0.01)
        return self

    def _readline(self, timeout: float = 10) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"target {self.host.name}:{self.pid} did not answer"
        return self.proc.stdout.readline().rstrip("\n")

    def call(self, name: str, arg: int = 0) -> str:
        """Returns the target's answer to calling ``name(arg)``."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {arg}\n")
        self.proc.stdin.flush()
        return self._readline()

    @property
    def host_pid(self) -> int:
        """Returns the target's pid in the root PID namespace (nsenter's child)."""
        assert self.proc is not None
        (pid,) = _children(self.proc.pid)
        return pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Ends the target: EOF on its stdin, SIGKILL if it does not exit."""
        if self.proc is None:
            return
        kids = _children(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class Fleet:
    """The managed hosts and their network: a bridge with the controller's address, one
    network namespace per host. ``teardown`` (and ``cleanup`` of leftovers of an earlier
    run that was killed) removes everything."""

    def __init__(self, base: Path, count: int) -> None:
        self.base = base
        self.app = base / "app"  # the application directory, as every host sees it
        self.hosts = [Host(i, base / f"h{i}", self.app) for i in range(1, count + 1)]

    def cleanup(self) -> None:
        """Removes hosts and the bridge left by an earlier run (processes killed first)."""
        for h in self.hosts:
            h.stop()
            pids = run("ip", "netns", "pids", h.netns, check=False)
            if pids.returncode == 0:  # the namespace exists
                left = [int(p) for p in pids.stdout.split()]
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 10
                while any(_running(pid) for pid in left) and time.monotonic() < deadline:
                    time.sleep(0.05)
            # The root end of the veth pair: a namespace goes away only when nothing
            # holds it any more, its interfaces with it.
            run("ip", "link", "del", f"{h.netns}v", check=False)
            run("ip", "netns", "del", h.netns, check=False)
        run("ip", "link", "del", BRIDGE, check=False)

    def setup(self, authorized_keys: Path) -> None:
        self.cleanup()
        self.app.mkdir(parents=True, exist_ok=True)
        # The mount points of each host's store and staging directory.
        for d in (STORE, STAGING):
            d.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{CONTROLLER}/{PREFIX}", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for h in self.hosts:
            veth = f"{h.netns}v"
            run("ip", "netns", "add", h.netns)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            run("ip", "link", "set", veth, "master", BRIDGE, "up")
            run("ip", "-n", h.netns, "addr", "add", f"{h.address}/{PREFIX}", "dev", "eth0")
            run("ip", "-n", h.netns, "link", "set", "eth0", "up")
            run("ip", "-n", h.netns, "link", "set", "lo", "up")
        for h in self.hosts:
            h.start(authorized_keys)

    def install_app(self, exe: Path) -> Path:
        """Copies program ``exe`` into every host's application directory; returns its
        path on the hosts (the same on all of them)."""
        for h in self.hosts:
            shutil.copy2(exe, h.app_dir / exe.name)
        return self.app / exe.name

    def teardown(self) -> None:
        self.cleanup()

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)


def corrupt_padding(t: HostTarget, exe: Path) -> None:
    """Changes one padding byte of use_helper in the running process, so that its bytes
    differ from what the patch expects (the agent refuses with EXPECTED_MISMATCH)."""
    sym = elf_symbol(exe, "use_helper")
    pid = t.host_pid
    with open(f"/proc/{pid}/maps") as maps:
        bias = min(
            int(line.split("-")[0], 16) for line in maps if line.rstrip().endswith("/target")
        )
    with open(f"/proc/{pid}/mem", "r+b") as mem:
        mem.seek(bias + sym["st_value"] - 6)
        mem.write(b"\xcc")
