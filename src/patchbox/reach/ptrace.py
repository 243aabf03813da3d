"""The few ptrace(2) requests patchbox uses, through ctypes, for processes of this host's
architecture (its register layout: ``Arch.registers``, :mod:`patchbox.arch`).

``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` stop one thread without a signal (no SIGSTOP the
program could see, no group stop), ``GETREGS``/``SETREGS`` read and write its registers,
``GETREGSET`` its FP/vector state, ``GETSIGMASK``/``SETSIGMASK`` its blocked signals,
``CONT`` and ``SYSCALL`` resume it (the latter until its next system call entry or exit,
told apart by ``GET_SYSCALL_INFO``), ``DETACH`` lets it go. Only the thread that seized
a thread may trace it: every call here must come from one thread of the client. If the
client dies, the kernel detaches its tracees and they run on, with whatever registers
they have at that instant (seize never sets ``PTRACE_O_EXITKILL``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

from patchbox.arch import host_arch
from patchbox.errors import PatchboxError

__all__ = [
    "REGISTERS",
    "Regs",
    "SyscallInfo",
    "PtraceError",
    "seize",
    "interrupt",
    "wait_stop",
    "is_syscall_stop",
    "get_regs",
    "set_regs",
    "get_xstate",
    "get_sigmask",
    "set_sigmask",
    "syscall_info",
    "cont",
    "resume_syscall",
    "detach",
    "peek",
    "peek_string",
    "poke",
]

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_O_TRACESYSGOOD = 1  # syscall stops report SIGTRAP | 0x80
WALL = 0x40000000  # __WALL: wait for threads (clones) too
PTRACE_EVENT_STOP = 128
SYSCALL_ENTRY, SYSCALL_EXIT = 1, 2  # PTRACE_SYSCALL_INFO_ENTRY / _EXIT
_SPINS = 20  # waitpid(WNOHANG) tries before wait_stop sleeps
_XSTATE_MAX = 16384  # larger than any FP state area (AMX tiles included: 11 KiB)


class PtraceError(PatchboxError):
    """A ptrace request failed (``errno`` holds the cause)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


#: The register layout of this host's processes (names of the pc, sp, ... among them).
REGISTERS = host_arch().registers


class Regs(ctypes.Structure):
    """The general registers ``PTRACE_GETREGS`` reads (``Registers.names``: the kernel's
    struct, every field 8 bytes)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in REGISTERS.names]

    def copy(self) -> Regs:
        """Returns an independent copy."""
        out = Regs()
        ctypes.pointer(out)[0] = self
        return out


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


@dataclass(frozen=True)
class SyscallInfo:
    """A syscall stop as ``PTRACE_GET_SYSCALL_INFO`` tells it: entry (``nr``) or exit
    (``rval``, negative errno on error), with the thread's pc and sp."""

    op: int  # SYSCALL_ENTRY, SYSCALL_EXIT, 0 for no syscall stop
    ip: int
    sp: int
    nr: int = -1
    rval: int = 0
    is_error: bool = False


def _call(req: int, tid: int, addr: int | None, data: object, what: str) -> int:
    ctypes.set_errno(0)
    res = _libc.ptrace(req, tid, addr, data)
    err = ctypes.get_errno()
    if res == -1 and err:
        raise PtraceError(f"{what} of thread {tid}: {os.strerror(err)}", err)
    return int(res)


def seize(tid: int, options: int = 0) -> None:
    """Traces thread ``tid`` without stopping it (``options``: PTRACE_O_* bits)."""
    _call(PTRACE_SEIZE, tid, None, ctypes.c_void_p(options or None), "PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    """Asks a seized thread to stop (a PTRACE_EVENT_STOP; see :func:`wait_stop`)."""
    _call(PTRACE_INTERRUPT, tid, None, None, "PTRACE_INTERRUPT")


def wait_stop(tid: int, timeout: float, *, wake_on: Collection[int] = ()) -> int:
    """Returns the wait status of ``tid``'s next stop; raises PtraceError on timeout
    (ETIMEDOUT), if it exited (ESRCH), or (EINTR) when one of ``wake_on``, blocked in
    the calling thread, arrives first (it is left pending). A thread in uninterruptible
    sleep stops only when it leaves it. With SIGCHLD blocked in the calling thread
    (:func:`patchbox.reach.defer.deferred_signals`) it sleeps until the kernel's SIGCHLD
    for the stop, else it polls."""
    deadline = time.monotonic() + timeout
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    waits = signal.SIGCHLD in blocked
    wake = {signal.Signals(s) for s in wake_on} & blocked
    delay = 0.00005
    spins = _SPINS  # a tracee resumed a moment ago often stops again within microseconds
    while True:
        try:
            got, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError as err:
            raise PtraceError(f"thread {tid} is gone", errno.ESRCH) from err
        if got == tid:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise PtraceError(f"thread {tid} exited", errno.ESRCH)
            if os.WIFSTOPPED(status):
                return status
        if wake & set(signal.sigpending()):
            raise PtraceError(f"waiting for thread {tid}: interrupted", errno.EINTR)
        left = deadline - time.monotonic()
        if left < 0:
            raise PtraceError(f"thread {tid} did not stop within {timeout:g} s", errno.ETIMEDOUT)
        if spins:
            spins -= 1
            continue
        if waits:
            # Every ptrace stop sends the tracer SIGCHLD: consumed here, then waitpid
            # again (several stops may share one signal; a stray one costs a loop). A
            # signal of ``wake`` is consumed too, and put back (blocked: pending again).
            got_sig = signal.sigtimedwait({signal.SIGCHLD} | wake, min(left, 0.05))
            if got_sig is not None and got_sig.si_signo != signal.SIGCHLD:
                signal.pthread_kill(threading.get_ident(), got_sig.si_signo)
        else:
            time.sleep(delay)
            delay = min(delay * 2, 0.002)


def is_syscall_stop(status: int) -> bool:
    """Returns whether wait status ``status`` is a syscall stop (PTRACE_O_TRACESYSGOOD)."""
    return os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP | 0x80


def get_regs(tid: int) -> Regs:
    """Returns the user registers of stopped thread ``tid``."""
    regs = Regs()
    _call(PTRACE_GETREGS, tid, None, ctypes.byref(regs), "PTRACE_GETREGS")
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    """Sets the user registers of stopped thread ``tid``."""
    _call(PTRACE_SETREGS, tid, None, ctypes.byref(regs), "PTRACE_SETREGS")


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def get_xstate(tid: int) -> bytes:
    """Returns the FP/vector state of stopped thread ``tid`` (the regset
    ``Registers.fp_regset`` names, as the kernel fills it in a signal frame)."""
    buf = ctypes.create_string_buffer(_XSTATE_MAX)
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), _XSTATE_MAX)
    _call(PTRACE_GETREGSET, tid, REGISTERS.fp_regset, ctypes.byref(iov), "PTRACE_GETREGSET")
    return buf.raw[: iov.len]


def get_sigmask(tid: int) -> int:
    """Returns the blocked-signal mask of stopped thread ``tid`` (bit N-1: signal N)."""
    mask = ctypes.c_uint64()
    _call(PTRACE_GETSIGMASK, tid, 8, ctypes.byref(mask), "PTRACE_GETSIGMASK")
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    """Sets the blocked-signal mask of stopped thread ``tid`` (the kernel never blocks
    SIGKILL or SIGSTOP)."""
    value = ctypes.c_uint64(mask)
    _call(PTRACE_SETSIGMASK, tid, 8, ctypes.byref(value), "PTRACE_SETSIGMASK")


_SYSCALL_INFO = struct.Struct("<B3xIQQ")  # op, arch, instruction_pointer, stack_pointer
_SYSCALL_INFO_SIZE = 88


def syscall_info(tid: int) -> SyscallInfo:
    """Returns what stopped thread ``tid``'s syscall stop is (entry and number, or exit
    and result); ``op`` 0 when the stop is no syscall stop."""
    buf = ctypes.create_string_buffer(_SYSCALL_INFO_SIZE)
    _call(PTRACE_GET_SYSCALL_INFO, tid, _SYSCALL_INFO_SIZE, buf, "PTRACE_GET_SYSCALL_INFO")
    op, _arch, ip, sp = _SYSCALL_INFO.unpack_from(buf.raw)
    rest = buf.raw[_SYSCALL_INFO.size :]
    if op == SYSCALL_ENTRY:
        return SyscallInfo(op, ip, sp, nr=struct.unpack_from("<Q", rest)[0])
    if op == SYSCALL_EXIT:
        rval, is_error = struct.unpack_from("<qB", rest)
        return SyscallInfo(op, ip, sp, rval=rval, is_error=bool(is_error))
    return SyscallInfo(op, ip, sp)


def cont(tid: int, sig: int = 0) -> None:
    """Resumes stopped thread ``tid`` (delivering ``sig`` if not 0)."""
    _call(PTRACE_CONT, tid, None, ctypes.c_void_p(sig or None), "PTRACE_CONT")


def resume_syscall(tid: int, sig: int = 0) -> None:
    """Resumes stopped thread ``tid`` until its next syscall entry or exit (or signal)."""
    _call(PTRACE_SYSCALL, tid, None, ctypes.c_void_p(sig or None), "PTRACE_SYSCALL")


def detach(tid: int, sig: int = 0) -> None:
    """Stops tracing ``tid`` (delivering ``sig`` if not 0); a stopped thread runs on. A
    thread already gone, or not in a stop (nothing can be done then), is fine."""
    try:
        _call(PTRACE_DETACH, tid, None, ctypes.c_void_p(sig or None), "PTRACE_DETACH")
    except PtraceError as err:
        if err.errno != errno.ESRCH:
            raise


def peek(pid: int, addr: int, n: int) -> bytes:
    """Returns ``n`` bytes at ``addr`` of process ``pid`` (through /proc/PID/mem)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def poke(pid: int, addr: int, data: bytes) -> None:
    """Writes ``data`` at ``addr`` of process ``pid`` (through /proc/PID/mem: a traced,
    stopped thread's process)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        if os.pwrite(fd, data, addr) != len(data):
            raise PtraceError(f"short write of {len(data)} bytes at {addr:#x} in pid {pid}")
    finally:
        os.close(fd)


def peek_string(pid: int, addr: int, limit: int = 512) -> str:
    """Returns the NUL-terminated string at ``addr`` of process ``pid`` (at most ``limit``
    bytes), "" if unreadable."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return ""
    try:
        raw = os.pread(fd, limit, addr)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return raw.split(b"\0", 1)[0].decode(errors="replace")
