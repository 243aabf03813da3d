"""The few ptrace(2) requests patchbox uses, through ctypes (x86-64 Linux).

``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` stop one thread without a signal (no SIGSTOP the
program could see, no group stop), ``GETREGS``/``SETREGS`` read and write its registers,
``CONT`` resumes it, ``DETACH`` lets it go. Only the thread that seized a thread may
trace it: every call here must come from one thread of the client. If the client dies,
the kernel detaches its tracees and they run on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time

from patchbox.errors import PatchboxError

__all__ = [
    "Regs",
    "PtraceError",
    "seize",
    "interrupt",
    "wait_stop",
    "get_regs",
    "set_regs",
    "cont",
    "detach",
    "peek_string",
    "poke",
]

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for threads (clones) too
PTRACE_EVENT_STOP = 128


class PtraceError(PatchboxError):
    """A ptrace request failed (``errno`` holds the cause)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


_REG_NAMES = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64 (sys/user.h)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]

    def copy(self) -> Regs:
        """Returns an independent copy."""
        out = Regs()
        ctypes.pointer(out)[0] = self
        return out


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _call(req: int, tid: int, addr: int | None, data: object, what: str) -> int:
    ctypes.set_errno(0)
    res = _libc.ptrace(req, tid, addr, data)
    err = ctypes.get_errno()
    if res == -1 and err:
        raise PtraceError(f"{what} of thread {tid}: {os.strerror(err)}", err)
    return int(res)


def seize(tid: int) -> None:
    """Traces thread ``tid`` without stopping it."""
    _call(PTRACE_SEIZE, tid, None, None, "PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    """Asks a seized thread to stop (a PTRACE_EVENT_STOP; see :func:`wait_stop`)."""
    _call(PTRACE_INTERRUPT, tid, None, None, "PTRACE_INTERRUPT")


def wait_stop(tid: int, timeout: float) -> int:
    """Returns the wait status of ``tid``'s next stop; raises PtraceError on timeout or if
    it exited. A thread in uninterruptible sleep stops only when it leaves it."""
    deadline = time.monotonic() + timeout
    delay = 0.00005
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
        if time.monotonic() > deadline:
            raise PtraceError(f"thread {tid} did not stop within {timeout:g} s", errno.ETIMEDOUT)
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def get_regs(tid: int) -> Regs:
    """Returns the user registers of stopped thread ``tid``."""
    regs = Regs()
    _call(PTRACE_GETREGS, tid, None, ctypes.byref(regs), "PTRACE_GETREGS")
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    """Sets the user registers of stopped thread ``tid``."""
    _call(PTRACE_SETREGS, tid, None, ctypes.byref(regs), "PTRACE_SETREGS")


def cont(tid: int, sig: int = 0) -> None:
    """Resumes stopped thread ``tid`` (delivering ``sig`` if not 0)."""
    _call(PTRACE_CONT, tid, None, ctypes.c_void_p(sig), "PTRACE_CONT")


def detach(tid: int) -> None:
    """Stops tracing ``tid``; a stopped thread runs on. A thread already gone is fine."""
    try:
        _call(PTRACE_DETACH, tid, None, None, "PTRACE_DETACH")
    except PtraceError as err:
        if err.errno != errno.ESRCH:
            raise


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
