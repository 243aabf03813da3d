"""`patchbox attach`: load the agent (``libsandbox.so``) into a running process that was
started without it (docs/reach.md, "Attach").

One thread is stopped with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: one blocked in a
system call that holds no lock the loader needs (read, poll, epoll_wait, nanosleep,
accept...; a thread interrupted inside ``malloc`` or holding the loader's lock would
deadlock ``dlopen``). It is made to call ``dlopen(path, RTLD_NOW)`` of the process's own
``libc.so.6`` (glibc 2.34+ exports it there), and the call returns into glibc's
``__restore_rt`` with a signal frame above it (``Arch.sigframe``, :mod:`patchbox.arch`): the
kernel's ``rt_sigreturn`` then puts back every register, the FPU state and the signal
mask as they were, the interrupted system call made again. The thread comes back by
itself: the client only watches (``PTRACE_SYSCALL``) and never writes into a thread
that runs. The library's constructor starts the agent thread (and applies the store's
patches).

The invariant: at every instant, if the client dies (SIGKILL; the kernel then detaches
its tracees as they are), the target is untouched or attached, and keeps running.
Signals that would end or stop the client are deferred while it holds the thread
(:mod:`patchbox.reach.defer`).

Refused, with the reason and before anything is touched: ptrace forbidden by Yama, a
seccomp filter, a static binary or no dynamic loader, a glibc without ``dlopen`` in
libc, another tracer, a stopped process, an agent already there, ``libsandbox.so``
not visible in the process's mount namespace, a CET shadow stack; and, unless asked for
explicitly, a process the kernel keeps same-uid tracers away from (setuid, setgid, file
capabilities, not dumpable: :func:`patchbox.procfs.privileged_reason`).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile
from elftools.elf.hash import GNUHashSection
from elftools.elf.sections import SymbolTableSection

from patchbox.arch import SigFrame, host_arch
from patchbox.elf.records import PT
from patchbox.elf.segments import PF_X, has_interp, read_program_headers, read_segment
from patchbox.errors import PatchboxError
from patchbox.procfs import (
    Mapping,
    exe_link,
    open_exe,
    privileged_reason,
    ptrace_scope,
    read_maps,
    read_status,
    root_path,
    task_ids,
    task_status,
    task_syscall,
)
from patchbox.protocol.discovery import discover
from patchbox.reach import ptrace
from patchbox.reach.defer import DEFERRED, deferred_signals, pending_deferred

__all__ = [
    "AttachError",
    "AlreadyAttached",
    "PrivilegedProcess",
    "LeftRunning",
    "AttachResult",
    "Preflight",
    "SAFE_SYSCALLS",
    "yama_refusal",
    "preflight",
    "attach",
]

CAP_SYS_PTRACE = 19
RTLD_NOW = 2
_ARCH = host_arch()  # ptrace reaches processes of this host's architecture
_REGS = _ARCH.registers
CALL_TIMEOUT = 60.0  # a dlopen still running after this is left to finish alone
_LET_GO_WAIT = 1.0  # how long a thread left running gets to stop so it can be detached
# System calls a thread may be blocked in and still be hijacked safely: they hold no
# lock of malloc or of the loader. (futex is left out: a thread waiting for one lock
# may hold another. rt_sigsuspend is left out: its signal mask is a temporary one the
# kernel swaps back on return, which no tracer can read.)
_SAFE_NAMES = (
    "read",
    "poll",
    "readv",
    "select",
    "pause",
    "nanosleep",
    "accept",
    "recvfrom",
    "recvmsg",
    "wait4",
    "rt_sigtimedwait",
    "clock_nanosleep",
    "epoll_wait",
    "pselect6",
    "ppoll",
    "epoll_pwait",
    "accept4",
    "epoll_pwait2",
)
#: {number: name} of those calls on this host (an architecture may lack some).
SAFE_SYSCALLS = {_ARCH.syscalls[n]: n for n in _SAFE_NAMES if n in _ARCH.syscalls}
# Calls that may run with a temporary signal mask, and the argument (its register) that
# points to it when they do (pselect6: to a {sigset pointer, size} pair).
_SYS_PSELECT6 = _ARCH.syscalls["pselect6"]
_TEMP_MASK_ARG = {
    _ARCH.syscalls[name]: _REGS.syscall_args[arg] if arg is not None else ""
    for name, arg in (
        ("poll", None),
        ("pselect6", 5),
        ("ppoll", 3),
        ("epoll_pwait", 4),
        ("epoll_pwait2", 4),
    )
    if name in _ARCH.syscalls
}
# Yama's ptrace_scope values above 1 (security/yama/yama_lsm.c): only CAP_SYS_PTRACE
# may trace; nobody may.
_YAMA_SCOPE_CAPABILITY, _YAMA_SCOPE_NO_ATTACH = 2, 3
_LIBC = re.compile(r"/libc\.so\.6$|/libc-2\.\d+\.so$")
# Signals blocked in the borrowed thread during the call, so that none of the program's
# handlers runs inside dlopen: all but SIGKILL/SIGSTOP (never blockable), glibc's own
# SIGCANCEL/SIGSETXID (glibc never blocks them: setuid() in another thread waits for
# every thread to take SIGSETXID) and the synchronous faults (SIGILL, SIGTRAP, SIGBUS,
# SIGFPE, SIGSEGV, SIGSYS: a fault inside the call is the program's fault either way).
_UNBLOCKED = {4, 5, 7, 8, 9, 11, 19, 31, 32, 33}
_CALL_MASK = sum(1 << (n - 1) for n in range(1, 65) if n not in _UNBLOCKED)


class AttachError(PatchboxError):
    """Attaching was refused or failed; ``retry`` when trying again may work."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class AlreadyAttached(AttachError):
    """The process has an agent already (linked, preloaded or attached)."""


class PrivilegedProcess(AttachError):
    """The kernel keeps same-uid tracers away from the process (setuid, setgid, file
    capabilities, not dumpable: :func:`patchbox.procfs.privileged_reason`), and
    attaching to it was not asked for explicitly (``include_privileged``)."""

    def __init__(self, pid: int, reason: str) -> None:
        super().__init__(
            f"pid {pid} is privileged: {reason}; not attached: its agent would let whoever "
            f"reaches its socket change code the kernel keeps them from tracing "
            f"(--include-privileged attaches all the same)"
        )
        self.reason = reason


class LeftRunning(AttachError):
    """The borrowed thread was still in dlopen when the client stopped waiting (the
    deadline, or a signal asking the client to quit): it was let go as it was and comes
    back to what it was doing by itself when dlopen returns (the agent then starts)."""


@dataclass(frozen=True)
class Preflight:
    """What attaching to a process needs, found before touching it."""

    pid: int
    library: str  # libsandbox.so, as the process sees it
    dlopen: int  # absolute address in the process
    restorer: int  # glibc's __restore_rt (SigFrame.restorer)


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
    if scope >= _YAMA_SCOPE_NO_ATTACH:
        return f"Yama ptrace_scope is {scope}: no process may be traced (set at boot, until reboot)"
    if scope == _YAMA_SCOPE_CAPABILITY and not privileged:
        return "Yama ptrace_scope is 2: only a process with CAP_SYS_PTRACE may trace (run as root)"
    if scope == 1 and not privileged and not ancestor:
        return (
            f"Yama ptrace_scope is 1: pid {pid} is not a descendant of this process "
            f"(run as root, or with CAP_SYS_PTRACE)"
        )
    return ""


@dataclass(frozen=True)
class _LibcFacts:
    """What attach needs of a libc file: link-time addresses, -1 where missing."""

    dlopen: int
    restorer: int  # glibc's __restore_rt (SigFrame.restorer)


_LIBC_FACTS: dict[tuple[int, int, int, int], _LibcFacts] = {}  # by file identity


def _libc_facts(path: str) -> _LibcFacts:
    """Returns ``dlopen`` (from .dynsym) and the ``rt_sigreturn`` sequence (in an
    executable segment) of libc file ``path``, cached by the file's identity."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _LIBC_FACTS:
        dlopen = restorer = -1
        with open(path, "rb") as f:
            elf = ELFFile(f)
            gnu_hash = elf.get_section_by_name(".gnu.hash")
            if isinstance(gnu_hash, GNUHashSection):
                sym = gnu_hash.get_symbol("dlopen")
                if sym is not None and sym["st_shndx"] != "SHN_UNDEF":
                    dlopen = sym["st_value"]
            else:  # no hash table: every symbol read (slow)
                sec = elf.get_section_by_name(".dynsym")
                if isinstance(sec, SymbolTableSection):
                    for sym in sec.iter_symbols():
                        if sym.name.split("@")[0] == "dlopen" and sym["st_shndx"] != "SHN_UNDEF":
                            dlopen = sym["st_value"]
                            break
            for ph in read_program_headers(f, path):
                if ph.p_type == PT["LOAD"] and ph.p_flags & PF_X:
                    at = read_segment(f, ph, path).find(_sigframe().restorer)
                    if at >= 0:
                        restorer = ph.p_vaddr + at
                        break
        _LIBC_FACTS[key] = _LibcFacts(dlopen, restorer)
    return _LIBC_FACTS[key]


def _shadow_stack(pid: int, tid: int) -> bool:
    """Returns whether thread ``tid`` runs with a CET user shadow stack (its returns
    are checked: a call that returns somewhere else than where it was called from
    faults)."""
    if _REGS.shadow_stack is None:
        return False
    key, word = _REGS.shadow_stack
    return word in task_status(pid, tid).get(key, "").split()


def _sigframe() -> SigFrame:
    """Returns the signal frame a borrowed thread comes back through; raises
    AttachError on an architecture where attach cannot borrow a thread yet."""
    if _ARCH.sigframe is None:
        raise AttachError(f"attach cannot borrow a thread on {_ARCH.title} yet")
    return _ARCH.sigframe


def _has_interp(pid: int) -> bool:
    """Returns whether ``pid``'s executable names a program interpreter (is dynamic)."""
    with open_exe(pid) as f:
        return has_interp(read_program_headers(f, f"pid {pid}'s executable"))


def _base(maps: list[Mapping], path: str) -> int:
    return min(m.start - m.offset for m in maps if m.path == path)


def preflight(pid: int, library: str, *, include_privileged: bool = False) -> Preflight:
    """Returns what attaching needs; raises AttachError naming why it cannot work,
    AlreadyAttached, or PrivilegedProcess (unless ``include_privileged``). Touches
    nothing."""
    _check_state(pid)
    why = yama_refusal(ptrace_scope(), pid, _cap_sys_ptrace(), _is_ancestor(pid))
    if why:
        raise AttachError(why)
    maps, exe = _dynamic_maps(pid)
    paths = {m.path for m in maps}
    _check_no_agent(pid, exe, paths)
    if not include_privileged:
        privileged = privileged_reason(pid)
        if privileged:
            raise PrivilegedProcess(pid, privileged)
    libc, facts = _mapped_libc(pid, exe, paths)
    if _shadow_stack(pid, pid):
        raise AttachError(
            f"pid {pid} runs with a CET shadow stack: the borrowed call's return would "
            f"fault (the shadow stack has no entry for it)"
        )
    lib = _visible_library(pid, library)
    base = _base(maps, libc)
    return Preflight(pid, lib, base + facts.dlopen, base + facts.restorer)


def _check_state(pid: int) -> None:
    """Raises AttachError unless ``pid`` is another process that runs (not a zombie, not
    stopped), is traced by nobody and has no seccomp filter or strict mode."""
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


def _dynamic_maps(pid: int) -> tuple[list[Mapping], str]:
    """Returns (the mappings, the executable's path) of ``pid``; raises AttachError if
    they cannot be read or the executable is static."""
    try:
        maps = read_maps(pid)
        exe = exe_link(pid)
        static = not _has_interp(pid)
    except OSError as err:
        raise AttachError(
            f"pid {pid}: {err.strerror}: run as root or as the process's user"
        ) from err
    if static:
        raise AttachError(
            f"pid {pid} ({exe}) is a static binary: no dynamic loader to load the agent with"
        )
    return maps, exe


def _check_no_agent(pid: int, exe: str, paths: set[str]) -> None:
    """Raises AttachError if ``pid`` maps no dynamic loader, AlreadyAttached if it maps
    the agent or listens on an agent socket already."""
    if not any(os.path.basename(p).startswith("ld-") for p in paths):
        raise AttachError(f"pid {pid} ({exe}) has no dynamic loader (ld.so) mapped")
    if any(os.path.basename(p).startswith("libsandbox.so") for p in paths) or any(
        c.listening for c in discover(pid, environ={}).candidates
    ):
        raise AlreadyAttached(f"pid {pid} has an agent already")


def _mapped_libc(pid: int, exe: str, paths: set[str]) -> tuple[str, _LibcFacts]:
    """Returns (path, facts) of the glibc ``pid`` maps; raises AttachError if it maps
    none, or one without dlopen or ``__restore_rt``."""
    libc = next((p for p in paths if _LIBC.search(p)), None)
    if libc is None:
        raise AttachError(f"pid {pid} ({exe}) does not map glibc's libc.so.6")
    facts = _libc_facts(root_path(pid, libc))
    if facts.dlopen < 0:
        raise AttachError(
            f"pid {pid}: {libc} exports no dlopen (glibc older than 2.34, or not glibc)"
        )
    if facts.restorer < 0:
        raise AttachError(f"pid {pid}: {libc} has no __restore_rt ({_sigframe().restorer.hex()})")
    return libc, facts


def _visible_library(pid: int, library: str) -> str:
    """Returns the real path of ``library``; raises AttachError unless ``pid`` sees the
    same file at that path (its mount namespace)."""
    lib = os.path.realpath(library)
    try:
        mine, theirs = os.stat(lib), os.stat(root_path(pid, lib))
        visible = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    except OSError:
        visible = False
    if not visible:
        raise AttachError(
            f"{lib} is not visible at the same path in pid {pid}'s mount namespace (a "
            f"container?): install patchbox there, or bind-mount the agent directory"
        )
    return lib


def _temp_mask(pid: int, regs: ptrace.Regs) -> bool:
    """Returns whether the system call ``regs`` was interrupted in replaced the thread's
    signal mask for its duration (ppoll, pselect6, epoll_pwait with a mask): the mask
    the thread goes back to is then the kernel's secret."""
    nr = int(getattr(regs, _REGS.syscall_nr))
    arg = _TEMP_MASK_ARG.get(nr)
    if not arg:
        return False
    ptr = int(getattr(regs, arg))
    if ptr and nr == _SYS_PSELECT6:  # {const sigset_t *ss; size_t ss_len}
        ptr = int.from_bytes(ptrace.peek(pid, ptr, 8), "little")
    return ptr != 0


def _tracer(pid: int, tid: int) -> int:
    """Returns the TracerPid of thread ``tid`` of ``pid`` (0: none or gone)."""
    try:
        return int(task_status(pid, tid).get("TracerPid", "0") or 0)
    except ValueError:
        return 0


def _unusable(pid: int, tid: int, regs: ptrace.Regs) -> str:
    """Returns why stopped thread ``tid`` (registers ``regs``) cannot be borrowed, ""
    if it can."""
    nr, pc, insn = getattr(regs, _REGS.syscall_nr), getattr(regs, _REGS.pc), _REGS.syscall_insn
    if nr not in SAFE_SYSCALLS:
        return "it had left its system call"
    if _temp_mask(pid, regs):
        return f"{SAFE_SYSCALLS[nr]} runs with a temporary signal mask"
    if ptrace.peek(pid, pc - len(insn), len(insn)) != insn:
        return "it is not stopped right after a syscall instruction"
    if _shadow_stack(pid, tid):
        return "it runs with a CET shadow stack"
    return ""


@dataclass
class _Borrow:
    """One thread lent to the call: where its frame is and what the call met."""

    pid: int
    tid: int
    syscall: str  # the system call it was interrupted in
    frame_sp: int
    restorer_end: int
    stop_ns: int = 0  # PTRACE_INTERRUPT to PTRACE_DETACH
    last_nr: int = -1  # the system call of the last entry stop
    failed: str = ""  # the last system call that failed during the call (a hint)


Phase = Callable[[str], None]


def _no_phase(_name: str) -> None:
    pass


def _let_go(tid: int, wait: float) -> bool:
    """Detaches ``tid`` at its next stop (within ``wait``), as it is: returns False if it
    did not stop (it stays traced by this client, and runs on when the client exits)."""
    try:
        ptrace.interrupt(tid)
    except ptrace.PtraceError:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            status = ptrace.wait_stop(tid, max(0.0, deadline - time.monotonic()))
        except ptrace.PtraceError as err:
            return err.errno == errno.ESRCH  # gone
        # A signal-delivery stop's signal is handed on; any other stop is just left.
        sig = 0
        if status >> 16 == 0 and not ptrace.is_syscall_stop(status):
            sig = os.WSTOPSIG(status)
        ptrace.detach(tid, sig)
        return True


def _supervise(b: _Borrow, timeout: float, phase: Phase) -> None:
    """Follows the call from one syscall stop to the next until it returns into the
    frame (the ``rt_sigreturn`` entry at ``__restore_rt`` with the frame's stack), lets
    the kernel restore the thread, and detaches it at the ``rt_sigreturn`` exit. Raises
    LeftRunning when the deadline passes or the client is asked to quit first (the
    thread let go as it is: it returns through the frame alone)."""
    deadline = time.monotonic() + timeout
    returned = False
    while True:
        quit_now = pending_deferred()
        if quit_now or time.monotonic() > deadline:
            phase("abandoned")
            detached = _let_go(b.tid, _LET_GO_WAIT)
            why = (
                f"signal {', '.join(sorted(s.name for s in quit_now))} to this client"
                if quit_now
                else f"still in dlopen after {timeout:g} s"
            )
            raise LeftRunning(
                f"pid {b.pid}: {why}: thread {b.tid} was left running its call; it comes "
                f"back to what it was doing by itself when dlopen returns"
                + ("" if detached else " (it stays traced by this client until it exits)")
            )
        try:
            status = ptrace.wait_stop(b.tid, 0.5, wake_on=DEFERRED)
        except ptrace.PtraceError as err:
            if err.errno in (errno.ETIMEDOUT, errno.EINTR):
                continue
            raise AttachError(f"pid {b.pid}: thread {b.tid} exited during the call") from err
        if ptrace.is_syscall_stop(status):
            info = ptrace.syscall_info(b.tid)
            if info.op == ptrace.SYSCALL_ENTRY:
                if (
                    info.nr == _sigframe().rt_sigreturn
                    and info.ip == b.restorer_end
                    and info.sp == b.frame_sp + 8
                ):
                    returned = True
                    phase("returned")
                b.last_nr = info.nr
            elif info.op == ptrace.SYSCALL_EXIT:
                if returned:
                    return  # rt_sigreturn done: the thread is as it was
                if info.is_error:
                    b.failed = f"system call {b.last_nr}: {os.strerror(-info.rval)}"
            ptrace.resume_syscall(b.tid)
        elif status >> 16 == ptrace.PTRACE_EVENT_STOP:
            ptrace.resume_syscall(b.tid)  # a group stop (SIGSTOP): this thread goes on
        else:
            ptrace.resume_syscall(b.tid, os.WSTOPSIG(status))  # a signal: handed on


def _borrow(
    pre: Preflight, tid: int, path: bytes, call_timeout: float, phase: Phase
) -> _Borrow | str:
    """Lends thread ``tid`` of ``pre.pid`` to ``dlopen(path)``; returns it once it is back
    and detached, or why it could not be used (it was let go untouched). Raises
    AttachError, LeftRunning."""
    pid = pre.pid
    sf = _sigframe()
    phase("seize")
    try:
        ptrace.seize(tid, ptrace.PTRACE_O_TRACESYSGOOD)
    except ptrace.PtraceError as err:
        if err.errno == errno.ESRCH:
            return f"thread {tid} exited"
        if _tracer(pid, tid) == os.getpid():  # left traced by an earlier try: never stopped
            return f"thread {tid} did not stop (uninterruptible sleep?)"
        raise AttachError(f"cannot trace pid {pid}: {err}") from err
    t0 = time.monotonic_ns()
    try:
        ptrace.interrupt(tid)
        status = ptrace.wait_stop(tid, 1.0)
        if status >> 16 != ptrace.PTRACE_EVENT_STOP:
            ptrace.detach(tid, os.WSTOPSIG(status))  # a signal came first: handed on
            return f"thread {tid} had a signal to take"
        if os.WSTOPSIG(status) != signal.SIGTRAP:
            ptrace.detach(tid)
            return f"thread {tid} was in a group stop (SIGSTOP)"
        saved = ptrace.get_regs(tid)
        phase("seized")
        why = _unusable(pid, tid, saved)
        if why:
            ptrace.detach(tid)
            return f"thread {tid}: {why}"
        frame = sf.build(
            saved,
            ptrace.get_xstate(tid),
            ptrace.get_sigmask(tid),
            pre.restorer,
            path,
            red_zone=sf.red_zone,
        )
        # Below the red zone: bytes no code of the thread reads until it runs again.
        ptrace.poke(pid, frame.addr, frame.data)
    except (ptrace.PtraceError, OSError) as err:
        _let_go(tid, _LET_GO_WAIT)  # nothing of the thread changed: it goes on as it was
        return f"thread {tid}: {err}"
    phase("frame")
    call = saved.copy()
    for reg, v in (
        (_REGS.pc, pre.dlopen),
        (_REGS.args[0], frame.arg),
        (_REGS.args[1], RTLD_NOW),
        (_REGS.sp, frame.sp),
        (_REGS.ret, 0),
        (_REGS.syscall_nr, (1 << 64) - 1),  # no system call to restart into these registers
    ):
        setattr(call, reg, v)
    was = SAFE_SYSCALLS[getattr(saved, _REGS.syscall_nr)]
    b = _Borrow(pid, tid, was, frame.sp, pre.restorer + len(sf.restorer))
    want = sf.restored(saved)
    try:
        # From this store on, the thread returns through the frame whatever the client
        # does: the call's registers, then every blockable signal blocked for the call
        # (the frame holds the mask to go back to).
        ptrace.set_regs(tid, call)
        ptrace.set_sigmask(tid, ptrace.get_sigmask(tid) | _CALL_MASK)
        ptrace.resume_syscall(tid)
        phase("call")
        _supervise(b, call_timeout, phase)
        # Stopped at the rt_sigreturn exit: the registers it goes on with.
        now = ptrace.get_regs(tid)
        got = {r: int(getattr(now, r)) for r in want}
        got[_REGS.flags] &= sf.fix_flags
        mismatch = [r for r, v in want.items() if got[r] != v]
        if mismatch:  # never seen; the thread is stopped, so it can still be mended
            for r in mismatch:
                flags = int(getattr(now, _REGS.flags)) & ~sf.fix_flags
                keep = flags if r == _REGS.flags else 0
                setattr(now, r, keep | want[r])
            ptrace.set_regs(tid, now)
        ptrace.detach(tid)
    except ptrace.PtraceError as err:
        detached = _let_go(tid, _LET_GO_WAIT)
        raise LeftRunning(
            f"pid {pid}: thread {tid}: {err}; it was left to come back through its frame"
            + ("" if detached else " (traced by this client until it exits)")
        ) from err
    phase("detached")
    b.stop_ns = time.monotonic_ns() - t0
    if mismatch:
        raise AttachError(
            f"pid {pid}: thread {tid} came back from rt_sigreturn with other registers "
            f"({', '.join(mismatch)}): set right before it went on"
        )
    return b


def attach(
    pid: int,
    library: str,
    *,
    wait_socket: float = 5.0,
    tries: int = 50,
    include_privileged: bool = False,
    call_timeout: float = CALL_TIMEOUT,
    on_phase: Phase | None = None,
) -> AttachResult:
    """Loads ``library`` (libsandbox.so) into ``pid``; returns what it took. Raises
    AttachError (nothing touched), AlreadyAttached, PrivilegedProcess for a process the
    kernel protects from same-uid tracing unless ``include_privileged``, or LeftRunning
    (the call was left to finish alone). ``on_phase`` is told each step as it is reached:
    seize (about to trace a thread), seized (stopped, nothing changed), frame (written
    below its red zone), call (in dlopen, coming back by itself), returned (at
    rt_sigreturn), detached, abandoned (left to finish alone)."""
    phase = on_phase or _no_phase
    pre = preflight(pid, library, include_privileged=include_privileged)
    path = pre.library.encode() + b"\0"
    why = "none was"
    for _attempt in range(tries):
        candidates = []
        for tid in task_ids(pid):
            st = task_syscall(pid, tid)
            if st is not None and st[0] in SAFE_SYSCALLS:
                candidates.append(tid)
        for tid in sorted(candidates, key=lambda t: t != pid):
            with deferred_signals():
                got = _borrow(pre, tid, path, call_timeout, phase)
            if isinstance(got, str):
                why = got
                continue
            if not _mapped(pid, pre.library):  # the thread is back as it was, all the same
                failed = f"; the last system call that failed in it: {got.failed}"
                raise AttachError(
                    f"pid {pid}: dlopen({pre.library}) failed (the library is not mapped after "
                    f"the call{failed if got.failed else ''})"
                )
            return AttachResult(
                pid, got.tid, got.syscall, got.stop_ns, _wait_socket(pid, wait_socket)
            )
        time.sleep(0.02)
    raise AttachError(
        f"pid {pid}: no thread stayed blocked in a system call that is safe to interrupt "
        f"({', '.join(sorted(set(SAFE_SYSCALLS.values())))}; last: {why}): retry when it "
        f"is idle",
        retry=True,
    )


def _mapped(pid: int, library: str) -> bool:
    """Returns whether process ``pid`` maps ``library`` (dlopen unmaps it on failure)."""
    try:
        return any(m.path == library for m in read_maps(pid))
    except OSError:
        return False


def _wait_socket(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in discover(pid, environ={}).candidates if c.listening]
        if found:
            return found[0].path
        time.sleep(0.01)
    return ""
