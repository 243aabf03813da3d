"""`patchbox attach`: load the agent (``libsandbox.so``) into a running process that was
started without it (docs/reach.md, "Attach").

One thread is stopped with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: one blocked in a
system call that holds no lock the loader needs (read, poll, epoll_wait, nanosleep,
accept...; a thread interrupted inside ``malloc`` or holding the loader's lock would
deadlock ``dlopen``). Its registers are saved; it is made to call ``dlopen(path,
RTLD_NOW)`` of the process's own ``libc.so.6`` (glibc 2.34+ exports it there) with the
path written on its stack below the red zone and a return address of 0, so that the
return faults and the client regains control; ``orig_rax = -1`` keeps the kernel from
restarting the interrupted system call into the borrowed registers. The saved registers
and stack bytes are put back and the thread is let go: the kernel then restarts the
interrupted call exactly as after any signal that had no handler. The library's
constructor starts the agent thread (and applies the store's patches).

Refused, with the reason and before anything is touched: ptrace forbidden by Yama, a
seccomp filter, a static binary or no dynamic loader, a glibc without ``dlopen`` in
libc, another tracer, a stopped process, an agent already there, ``libsandbox.so``
not visible in the process's mount namespace; and, unless asked for explicitly, a
process the kernel keeps same-uid tracers away from (setuid, setgid, file capabilities,
not dumpable: :func:`patchbox.reach.procfs.privileged_reason`).
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from patchbox.errors import PatchboxError
from patchbox.protocol.discovery import discover
from patchbox.reach import ptrace
from patchbox.reach.procfs import (
    Mapping,
    privileged_reason,
    read_maps,
    read_status,
    task_ids,
    task_syscall,
)

__all__ = [
    "AttachError",
    "AlreadyAttached",
    "PrivilegedProcess",
    "AttachResult",
    "Preflight",
    "SAFE_SYSCALLS",
    "YAMA_SCOPE",
    "yama_refusal",
    "preflight",
    "attach",
]

YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
CAP_SYS_PTRACE = 19
RTLD_NOW = 2
RED_ZONE = 128
# System calls a thread may be blocked in and still be hijacked safely: they hold no
# lock of malloc or of the loader. (futex is left out: a thread waiting for one lock
# may hold another.)
SAFE_SYSCALLS = {
    0: "read",
    7: "poll",
    19: "readv",
    23: "select",
    34: "pause",
    35: "nanosleep",
    43: "accept",
    45: "recvfrom",
    47: "recvmsg",
    61: "wait4",
    128: "rt_sigtimedwait",
    130: "rt_sigsuspend",
    230: "clock_nanosleep",
    232: "epoll_wait",
    270: "pselect6",
    271: "ppoll",
    281: "epoll_pwait",
    288: "accept4",
    441: "epoll_pwait2",
}
_LIBC = re.compile(r"/libc\.so\.6$|/libc-2\.\d+\.so$")


class AttachError(PatchboxError):
    """Attaching was refused or failed; ``retry`` when trying again may work."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class AlreadyAttached(AttachError):
    """The process has an agent already (linked, preloaded or attached)."""


class PrivilegedProcess(AttachError):
    """The kernel keeps same-uid tracers away from the process (setuid, setgid, file
    capabilities, not dumpable: :func:`patchbox.reach.procfs.privileged_reason`), and
    attaching to it was not asked for explicitly (``include_privileged``)."""

    def __init__(self, pid: int, reason: str) -> None:
        super().__init__(
            f"pid {pid} is privileged: {reason}; not attached: its agent would let whoever "
            f"reaches its socket change code the kernel keeps them from tracing "
            f"(--include-privileged attaches all the same)"
        )
        self.reason = reason


@dataclass(frozen=True)
class Preflight:
    """What attaching to a process needs, found before touching it."""

    pid: int
    library: str  # libsandbox.so, as the process sees it
    dlopen: int  # absolute address in the process
    dlerror: int


@dataclass(frozen=True)
class AttachResult:
    """A finished attach: the thread used, what it was doing, how long it was stopped."""

    pid: int
    tid: int
    syscall: str
    stopped_ns: int  # PTRACE_INTERRUPT → PTRACE_DETACH of that thread
    socket: str  # the agent's socket once it listens ("" if not seen in time)


def _cap_sys_ptrace() -> bool:
    eff = int(read_status(os.getpid()).get("CapEff", "0"), 16)
    return bool(eff >> CAP_SYS_PTRACE & 1)


def _is_ancestor(pid: int) -> bool:
    me, cur = os.getpid(), pid
    for _ in range(4096):
        ppid = int(read_status(cur).get("PPid", "0") or 0)
        if ppid == me:
            return True
        if ppid <= 1:
            return False
        cur = ppid
    return False


def yama_refusal(scope: int, pid: int, privileged: bool, ancestor: bool) -> str:
    """Returns why Yama's ``ptrace_scope`` forbids tracing ``pid``, "" if it allows it."""
    if scope >= 3:
        return f"Yama ptrace_scope is {scope}: no process may be traced (set at boot, until reboot)"
    if scope == 2 and not privileged:
        return "Yama ptrace_scope is 2: only a process with CAP_SYS_PTRACE may trace (run as root)"
    if scope == 1 and not privileged and not ancestor:
        return (
            f"Yama ptrace_scope is 1: pid {pid} is not a descendant of this process "
            f"(run as root, or with CAP_SYS_PTRACE)"
        )
    return ""


def _read_scope() -> int:
    try:
        return int(YAMA_SCOPE.read_text().strip())
    except (OSError, ValueError):
        return 0  # no Yama


def _dynsym(path: str, names: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".dynsym")
        if isinstance(sec, SymbolTableSection):
            for sym in sec.iter_symbols():
                base = sym.name.split("@")[0]
                if base in names and sym["st_shndx"] != "SHN_UNDEF" and base not in found:
                    found[base] = sym["st_value"]
    return found


def _has_interp(path: str) -> bool:
    with open(path, "rb") as f:
        return any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments())


def _base(maps: list[Mapping], path: str) -> int:
    return min(m.start - m.offset for m in maps if m.path == path)


def preflight(pid: int, library: str, *, include_privileged: bool = False) -> Preflight:
    """Returns what attaching needs; raises AttachError naming why it cannot work,
    AlreadyAttached, or PrivilegedProcess (unless ``include_privileged``). Touches
    nothing."""
    if pid == os.getpid():
        raise AttachError("cannot attach to the client itself")
    st = read_status(pid)
    if not st:
        raise AttachError(f"no process {pid}")
    state = st.get("State", "?")[:1]
    if state in ("Z", "X"):
        raise AttachError(f"pid {pid} is a zombie")
    tracer = int(st.get("TracerPid", "0") or 0)
    if tracer:
        who = read_status(tracer).get("Name", "?")
        raise AttachError(f"pid {pid} is already traced by pid {tracer} ({who}): detach it first")
    if state == "T":
        raise AttachError(f"pid {pid} is stopped (SIGSTOP): continue it first (kill -CONT {pid})")
    seccomp = st.get("Seccomp", "0")
    if seccomp == "2":
        raise AttachError(
            f"pid {pid} runs under a seccomp filter (Seccomp: 2): the system calls of dlopen "
            f"and of the agent (mmap, mprotect, socket, clone) may be refused or kill it"
        )
    if seccomp == "1":
        raise AttachError(f"pid {pid} runs in seccomp strict mode: only read/write/exit allowed")
    why = yama_refusal(_read_scope(), pid, _cap_sys_ptrace(), _is_ancestor(pid))
    if why:
        raise AttachError(why)
    try:
        maps = read_maps(pid)
        exe = os.readlink(f"/proc/{pid}/exe")
        static = not _has_interp(f"/proc/{pid}/exe")
    except OSError as err:
        raise AttachError(
            f"pid {pid}: {err.strerror}: run as root or as the process's user"
        ) from err
    if static:
        raise AttachError(
            f"pid {pid} ({exe}) is a static binary: no dynamic loader to load the agent with"
        )
    paths = {m.path for m in maps}
    if not any(os.path.basename(p).startswith("ld-") for p in paths):
        raise AttachError(f"pid {pid} ({exe}) has no dynamic loader (ld.so) mapped")
    if any(os.path.basename(p).startswith("libsandbox.so") for p in paths) or any(
        c.source.startswith("/proc/") for c in discover(pid, environ={}).candidates
    ):
        raise AlreadyAttached(f"pid {pid} has an agent already")
    if not include_privileged:
        privileged = privileged_reason(pid)
        if privileged:
            raise PrivilegedProcess(pid, privileged)
    libc = next((p for p in paths if _LIBC.search(p)), None)
    if libc is None:
        raise AttachError(f"pid {pid} ({exe}) does not map glibc's libc.so.6")
    syms = _dynsym(f"/proc/{pid}/root{libc}", ("dlopen", "dlerror"))
    if "dlopen" not in syms or "dlerror" not in syms:
        raise AttachError(
            f"pid {pid}: {libc} exports no dlopen (glibc older than 2.34, or not glibc)"
        )
    lib = os.path.realpath(library)
    try:
        mine, theirs = os.stat(lib), os.stat(f"/proc/{pid}/root{lib}")
        visible = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    except OSError:
        visible = False
    if not visible:
        raise AttachError(
            f"{lib} is not visible at the same path in pid {pid}'s mount namespace (a "
            f"container?): install patchbox there, or bind-mount the agent directory"
        )
    base = _base(maps, libc)
    return Preflight(pid, lib, base + syms["dlopen"], base + syms["dlerror"])


def _call(pid: int, tid: int, regs: ptrace.Regs, fn: int, arg: bytes | None) -> int:
    """Makes stopped thread ``tid`` (registers ``regs``) call ``fn(arg, RTLD_NOW)`` and
    returns its result (rax). ``arg``: bytes put on its stack (the pointer in rdi)."""
    sp = (regs.rsp - RED_ZONE - 256) & ~15
    rdi = 0
    if arg is not None:
        sp = (sp - len(arg)) & ~15
        rdi = sp
        ptrace.poke(pid, rdi, arg)
    sp -= 8  # at the entry (rsp + 8) % 16 == 0: the return address is 0, and faults
    ptrace.poke(pid, sp, bytes(8))
    call = regs.copy()
    call.rip, call.rdi, call.rsi, call.rsp, call.rax = fn, rdi, RTLD_NOW, sp, 0
    call.orig_rax = (1 << 64) - 1  # no system call to restart into these registers
    ptrace.set_regs(tid, call)
    ptrace.cont(tid)
    deadline = time.monotonic() + 60
    while True:
        status = ptrace.wait_stop(tid, max(0.1, deadline - time.monotonic()))
        sig = os.WSTOPSIG(status)
        if status >> 16 == ptrace.PTRACE_EVENT_STOP:
            ptrace.cont(tid)  # a group stop or our interrupt: go on
            continue
        now = ptrace.get_regs(tid)
        if sig == signal.SIGSEGV and now.rip == 0:
            return int(now.rax)
        ptrace.cont(tid, sig)  # a signal for the program meanwhile: delivered


def attach(
    pid: int,
    library: str,
    *,
    wait_socket: float = 5.0,
    tries: int = 50,
    include_privileged: bool = False,
) -> AttachResult:
    """Loads ``library`` (libsandbox.so) into ``pid``; returns what it took. Raises
    AttachError (nothing touched), AlreadyAttached, or PrivilegedProcess for a process
    the kernel protects from same-uid tracing unless ``include_privileged``."""
    pre = preflight(pid, library, include_privileged=include_privileged)
    path = pre.library.encode() + b"\0"
    for _attempt in range(tries):
        candidates = []
        for tid in task_ids(pid):
            st = task_syscall(pid, tid)
            if st is not None and st[0] in SAFE_SYSCALLS:
                candidates.append(tid)
        for tid in sorted(candidates, key=lambda t: t != pid):
            t0 = time.monotonic_ns()
            try:
                ptrace.seize(tid)
            except ptrace.PtraceError as err:
                raise AttachError(f"cannot trace pid {pid}: {err}") from err
            try:
                ptrace.interrupt(tid)
                ptrace.wait_stop(tid, 1.0)
                saved = ptrace.get_regs(tid)
            except ptrace.PtraceError:
                ptrace.detach(tid)
                continue
            if saved.orig_rax not in SAFE_SYSCALLS:  # it had left its system call
                ptrace.detach(tid)
                continue
            low = (saved.rsp - RED_ZONE - 256 - len(path) - 64) & ~15
            stack = _read(pid, low, saved.rsp - RED_ZONE - low)
            try:
                handle = _call(pid, tid, saved, pre.dlopen, path)
                why = ""
                if handle == 0:
                    at = _call(pid, tid, saved, pre.dlerror, None)
                    why = ptrace.peek_string(pid, at) if at else "unknown"
            finally:
                ptrace.poke(pid, low, stack)
                ptrace.set_regs(tid, saved)
                ptrace.detach(tid)
            stopped = time.monotonic_ns() - t0
            if handle == 0:
                raise AttachError(f"pid {pid}: dlopen({pre.library}) failed: {why}")
            return AttachResult(
                pid, tid, SAFE_SYSCALLS[saved.orig_rax], stopped, _wait_socket(pid, wait_socket)
            )
        time.sleep(0.02)
    raise AttachError(
        f"pid {pid}: no thread stayed blocked in a system call that is safe to interrupt "
        f"({', '.join(sorted(set(SAFE_SYSCALLS.values())))}): retry when it is idle",
        retry=True,
    )


def _read(pid: int, addr: int, n: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def _wait_socket(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in discover(pid, environ={}).candidates if c.source.startswith("/proc/")]
        if found:
            return found[0].path
        time.sleep(0.01)
    return ""
