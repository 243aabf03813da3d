"""A driver for a running target program of the end-to-end tests (its source:
``helpers.render``)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from patchbox.arch import Arch, get_arch_by_machine, host_arch
from patchbox.procfs import get_ns_pid
from patchbox.protocol.client import Client
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


def arch_of(exe: Path) -> Arch:
    """Returns the architecture of the ELF program ``exe`` (its ``e_machine``)."""
    with exe.open("rb") as f:
        return get_arch_by_machine(ELFFile(f)["e_machine"], str(exe))


def emulator(exe: Path) -> list[str]:
    """Returns the command that runs ``exe``: nothing for a program of this host's
    architecture, ``qemu-<arch>`` (Debian's qemu-user) for another's. Run without ``-L``:
    the program carries its cross loader path (helpers.cross_link_flags)."""
    arch = arch_of(exe)
    return [] if arch == host_arch() else [f"qemu-{arch.name}"]


def exec_ranges(exe: Path, bias: int) -> list[tuple[int, int]]:
    """Returns the [start, end) page ranges of the executable PT_LOAD segments of ``exe``
    loaded at ``bias``: what the program itself may execute."""
    page = 4096
    with exe.open("rb") as f:
        out = []
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1:  # PF_X
                start = (bias + seg["p_vaddr"]) & ~(page - 1)
                end = (bias + seg["p_vaddr"] + seg["p_memsz"] + page - 1) & ~(page - 1)
                out.append((start, end))
    return out


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

    A program of another architecture runs under ``qemu-<arch>`` (``emulator``): ``pid``
    is qemu's (the emulated program's ``getpid()`` too), ``env`` goes to the program
    through ``-E`` (an LD_PRELOAD must not reach qemu itself), and memory is read at guest
    address + ``guest_base`` (see ``code_snapshot``). (Not with ``argv``: the wrapper
    runs the program, which may not even be visible from here.)
    """

    # Class defaults: tests that make a Target for a process they started themselves
    # (Target.__new__) drive a native one.
    emulator: tuple[str, ...] = ()
    guest_base = 0

    def __init__(
        self,
        exe: Path,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        agent: bool = True,
    ) -> None:
        env = dict(env or {})
        self.exe = exe
        self.emulator = tuple(emulator(exe)) if argv is None else ()
        if self.emulator:
            argv = [
                *self.emulator,
                *(f for k, v in env.items() for f in ("-E", f"{k}={v}")),
                str(exe),
            ]
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
        ready = self._readline(30 if self.emulator else 10)  # qemu starts slower
        if argv and not self.emulator and ready != f"ready {self.pid}":
            # In its own pid namespace: the pid it printed is not ours for it.
            self.pid = host_pid_of(self.proc.pid, int(ready.split()[1]))
        assert ready == f"ready {get_ns_pid(self.pid)}", ready
        sock_dir = Path(env.get("PATCHBOX_SOCK_DIR", exe.parent))
        self.socket = sock_dir / f"sandbox-sock{self.pid}"
        if not agent:
            return
        if argv and not self.emulator:
            wait_for_agent(self.pid)
            return
        deadline = time.monotonic() + (30 if self.emulator else 10)
        while not self.socket.exists():
            assert self.alive(), f"target died: {self.stderr.read()}"
            assert time.monotonic() < deadline, "agent socket never appeared"
            time.sleep(0.01)
        if self.emulator:
            self.guest_base = self._guest_base()

    def _guest_base(self) -> int:
        """Returns host address - guest address of the emulated program's memory: where
        the host maps the start of its executable (offset 0 in /proc/PID/maps) less the
        load bias its agent reports. qemu-user on a 64-bit host maps a 64-bit guest 1:1
        (0), but it is measured, not assumed."""
        with Client(self.socket) as c:
            bias = int(c.info()["load_bias"], 16)
        exe = os.path.realpath(self.exe)
        with open(f"/proc/{self.pid}/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == exe and int(parts[2], 16) == 0:
                    return int(parts[0].split("-")[0], 16) - bias
        raise AssertionError(f"no mapping of {exe} at offset 0 in pid {self.pid}")

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
        """Returns {start: bytes} of every executable mapping of the target's executable
        (its text, and the sandbox inside it), keyed by the program's own addresses.

        Native: the mappings /proc/PID/maps marks executable. Emulated: qemu-user maps
        guest code readable only (it runs translations of it, not the code), so the
        ranges are the ELF's executable PT_LOAD segments at the agent's load bias, each
        checked to lie inside a host mapping of the file, read at + ``guest_base``."""
        out = {}
        exe = os.path.realpath(self.exe)
        with open(f"/proc/{self.pid}/maps") as maps:
            mapped = [line.split() for line in maps]
        files: list[tuple[int, int, str]] = []
        for parts in mapped:
            if len(parts) >= 6 and parts[5] == exe:
                first, last = parts[0].split("-")
                files.append((int(first, 16), int(last, 16), parts[1]))
        if self.emulator:
            with Client(self.socket) as c:
                bias = int(c.info()["load_bias"], 16)
            for start, end in exec_ranges(self.exe, bias):
                # The agent's mprotect calls split the file's mapping: the range must be
                # covered by adjacent pieces of it.
                host, host_end = start + self.guest_base, end + self.guest_base
                for lo, hi, _ in sorted(files):
                    if lo <= host < hi:
                        host = hi
                assert host >= host_end, f"{start:#x}-{end:#x} is no mapping of {exe}"
                out[start] = self.read(start, end - start)
        else:
            for start, end, perms in files:
                if "x" in perms:
                    out[start] = self.read(start, end - start)
        assert out, "no executable mapping found"
        return out

    def read(self, addr: int, n: int) -> bytes:
        """Returns ``n`` bytes at the program's address ``addr`` (a guest address for an
        emulated program), read through /proc/PID/mem."""
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(addr + self.guest_base)
            return mem.read(n)

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(5)
        self.stderr_text = self.stderr.read()
        for stream in (self.stdin, self.stdout, self.stderr):
            stream.close()
