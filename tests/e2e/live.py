"""A driver for a running target program of the end-to-end tests (its source:
``helpers.render``)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

from patchbox.procfs import get_ns_pid
from patchbox.protocol.discovery import Candidate, discover

HERE = Path(__file__).resolve().parent


def host_pid_of(parent: int, ns_pid: int) -> int:
    """Returns the pid (in our namespace) of the child of ``parent`` that is ``ns_pid``
    in its own pid namespace."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        nspid = fields.get("NSpid", "").split()
        if int(fields.get("PPid", "0")) == parent and nspid and int(nspid[-1]) == ns_pid:
            return int(nspid[0])
    raise AssertionError(f"no child of {parent} is pid {ns_pid} in its namespace")


def wait_for_agent(pid: int, timeout: float = 10) -> Candidate:
    """Returns where pid's agent listens, once /proc/PID/net/unix shows it (the way the
    client finds it: whatever the process's mount namespace or directory length)."""
    deadline = time.monotonic() + timeout
    while True:
        found = discover(pid, environ={})
        mine = [c for c in found.candidates if c.listening]
        if mine:
            return mine[0]
        assert time.monotonic() < deadline, f"no agent of pid {pid}: {found.notes}"
        time.sleep(0.02)


class Target:
    """A running target process, driven through its stdin/stdout.

    ``argv`` runs something that ends by exec'ing ``exe`` (unshare, a shell) instead of
    ``exe`` itself; then the agent is awaited through /proc (the socket may lie in
    another mount namespace) rather than as a file beside ``exe``. With ``agent`` false
    no socket is awaited (a process started with its agent disabled).
    """

    def __init__(
        self,
        exe: Path,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        agent: bool = True,
    ) -> None:
        env = dict(env or {})
        self.exe = exe
        self.proc = subprocess.Popen(
            argv or [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **env},
        )
        self._keep_pipes()
        self.pid = self.proc.pid
        ready = self._readline(10)
        if argv and ready != f"ready {self.pid}":
            # In its own pid namespace: the pid it printed is not ours for it.
            self.pid = host_pid_of(self.proc.pid, int(ready.split()[1]))
        assert ready == f"ready {get_ns_pid(self.pid)}", ready
        sock_dir = Path(env.get("PATCHBOX_SOCK_DIR", exe.parent))
        self.socket = sock_dir / f"sandbox-sock{self.pid}"
        if not agent:
            return
        if argv:
            wait_for_agent(self.pid)
            return
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "agent socket never appeared"
            time.sleep(0.01)

    def _keep_pipes(self) -> None:
        """Keeps the three pipes of ``self.proc`` as typed attributes."""
        stdin, stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None  # all piped
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def _readline(self, timeout: float = 10) -> str:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        assert ready, f"target {self.pid} did not answer (alive={self.alive()})"
        return self.stdout.readline().rstrip("\n")

    def call(self, name: str, arg: int = 0) -> str:
        """Returns the target's answer to calling ``name(arg)``."""
        self.stdin.write(f"{name} {arg}\n")
        self.stdin.flush()
        return self._readline()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def code_snapshot(self) -> dict[int, bytes]:
        """Returns {start: bytes} of every executable mapping of the target's executable."""
        out = {}
        exe = os.path.realpath(self.exe)
        with open(f"/proc/{self.pid}/maps") as maps, open(f"/proc/{self.pid}/mem", "rb") as mem:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and "x" in parts[1] and parts[5] == exe:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    mem.seek(start)
                    out[start] = mem.read(end - start)
        assert out, "no executable mapping found"
        return out

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(addr)
            return mem.read(n)

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(5)
        self.stderr_text = self.stderr.read()
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()
