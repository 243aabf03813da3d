"""The x86-64 signal frame that brings a borrowed thread back by itself (docs/reach.md,
"Attach"); :data:`patchbox.arch.x86_64.ARCH` names it (``Arch.sigframe``) for
:mod:`patchbox.reach.attach`.

``rt_sigreturn`` (system call 15) reads a ``struct rt_sigframe`` at ``rsp - 8`` and
loads every register from it: general registers, ``rip``, ``rsp``, flags, the whole
FPU/SSE/AVX state (an XSAVE area it points to), and the signal mask. A signal handler
returns through it; so does a borrowed thread here. The injected call's return address
is glibc's ``__restore_rt`` (``mov $15, %rax; syscall``), and the frame above it holds the
thread's state as it must resume: the call returns, the kernel restores the thread,
whether or not the client is still there to watch.

Layout (Linux ``arch/x86/include/asm/sigframe.h``, ``uapi/asm/sigcontext.h``, ``ucontext.h``;
checked against the C headers by ``tests/reach/test_sigframe.py``)::

    frame +0     pretcode      the return address of the call (__restore_rt)
          +8     uc_flags      UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
          +16    uc_link       0
          +24    uc_stack      ss_sp, ss_flags, ss_size: an invalid ss_flags, so that
                               sigreturn's sigaltstack restore fails (it ignores that) and
                               the thread's alternate stack stays as it is
          +48    uc_mcontext   struct sigcontext: r8..r15, rdi, rsi, rbp, rbx, rdx, rax,
                               rcx, rsp, rip, eflags, cs/gs/fs/ss, err, trapno, oldmask,
                               cr2, fpstate (pointer), reserved
          +304   uc_sigmask    the mask the thread gets back
          +312   siginfo       128 bytes, unused here
          ...    XSAVE area    64-byte aligned; FP_XSTATE_MAGIC2 right after xstate_size
"""

from __future__ import annotations

import struct

from patchbox.arch.model import Frame, RegisterFile

__all__ = [
    "RT_SIGRETURN",
    "RESTORER",
    "FRAME_OFFSETS",
    "SIGCONTEXT_REGS",
    "Frame",
    "resume_regs",
    "restored",
    "build_frame",
]

RT_SIGRETURN = 15
# glibc's __restore_rt: `mov $15, %rax; syscall`, the sa_restorer of every handler.
RESTORER = bytes.fromhex("48c7c00f0000000f05")
SYSCALL_INSN = b"\x0f\x05"

UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 1, 2, 4
SS_INVALID = 3  # neither 0, SS_ONSTACK nor SS_DISABLE: do_sigaltstack returns EINVAL
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
SW_RESERVED = 464  # struct _fpx_sw_bytes inside the 512-byte legacy area
FXSAVE_SIZE = 512

FRAME_OFFSETS = {
    "pretcode": 0,
    "uc_flags": 8,
    "uc_link": 16,
    "uc_stack": 24,
    "uc_mcontext": 48,
    "uc_sigmask": 304,
    "info": 312,
}
FRAME_SIZE = 440  # up to the end of siginfo
# struct sigcontext (64-bit), in order: the general registers by their ptrace names.
SIGCONTEXT_REGS = (
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rdi",
    "rsi",
    "rbp",
    "rbx",
    "rdx",
    "rax",
    "rcx",
    "rsp",
    "rip",
    "eflags",
)
_SEGMENTS = struct.Struct("<HHHH")  # cs, gs, fs, ss right after eflags
_FPSTATE_AT = 8 * len(SIGCONTEXT_REGS) + _SEGMENTS.size + 4 * 8  # after err..cr2: 184

# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND: the kernel rewinds to the `syscall`
# instruction with rax = the call's number. -ERESTART_RESTARTBLOCK: it would run
# restart_syscall, whose state sigreturn clears; the call is made again instead.
_RESTART = {512, 513, 514}
_RESTART_BLOCK = 516


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def resume_regs(regs: RegisterFile) -> RegisterFile:
    """Returns the registers a thread stopped in a system call (``regs``, read at its
    ``PTRACE_INTERRUPT`` stop) must go on with: what the kernel would have made of them
    had it been let go there. An interrupted restartable call is made again (``rip``
    back on its ``syscall``, ``rax`` = its number; a relative sleep or a poll timeout then
    starts over); a finished one, or one that failed with ``EINTR``, returns its
    result."""
    out: RegisterFile = regs.copy()
    err = -_signed(regs.rax)
    if _signed(regs.orig_rax) >= 0 and (err in _RESTART or err == _RESTART_BLOCK):
        out.rax = regs.orig_rax
        out.rip = regs.rip - len(SYSCALL_INSN)
    out.orig_rax = (1 << 64) - 1  # what sigreturn leaves: no system call in progress
    return out


# The flags sigreturn takes from the frame (the kernel's FIX_EFLAGS: AC, OF, DF, TF, SF,
# ZF, AF, PF, CF, RF); the others stay the kernel's.
FIX_EFLAGS = 0x50DD5


def restored(regs: RegisterFile) -> dict[str, int]:
    """Returns the registers (by ptrace name) that a thread stopped with ``regs`` shows
    at the exit of its ``rt_sigreturn`` through :func:`build_frame`'s frame; ``eflags``
    masked with :data:`FIX_EFLAGS`."""
    out = resume_regs(regs)
    want = {r: int(getattr(out, r)) for r in SIGCONTEXT_REGS if r != "eflags"}
    want["eflags"] = int(out.eflags) & FIX_EFLAGS
    want["cs"], want["ss"] = int(out.cs), int(out.ss)
    return want


def _xstate_for_frame(xstate: bytes) -> tuple[bytes, int]:
    """Returns the XSAVE area as a signal frame carries it (FP_XSTATE_MAGIC2 after
    ``xstate_size``) and that size. An area without the kernel's sw_reserved bytes
    (no XSAVE: 512 bytes of FXSAVE) is restored as x87 + SSE alone."""
    magic1, _ext, _features, size = struct.unpack_from("<IIQI", xstate, SW_RESERVED)
    if magic1 != FP_XSTATE_MAGIC1 or not FXSAVE_SIZE < size <= len(xstate):
        return xstate[:FXSAVE_SIZE], FXSAVE_SIZE
    return xstate[:size] + struct.pack("<I", FP_XSTATE_MAGIC2), size


def build_frame(
    regs: RegisterFile,
    xstate: bytes,
    sigmask: int,
    restorer: int,
    arg: bytes,
    *,
    red_zone: int = 128,
) -> Frame:
    """Returns the frame that makes a thread stopped with ``regs`` (and FPU state
    ``xstate``, blocked signals ``sigmask``) resume as :func:`resume_regs` says once a
    function called with ``rsp = Frame.sp`` returns to ``restorer``. It lies below the
    red zone of ``regs.rsp``; the function's own frames go below it."""
    fp, _size = _xstate_for_frame(xstate)
    top = regs.rsp - red_zone
    fpstate = (top - len(fp)) & ~63  # xrstor wants 64-byte alignment
    arg_at = (fpstate - len(arg)) & ~15
    # The call's rsp: rsp + 8 is 16-aligned at a function's entry (the return address).
    sp = ((arg_at - FRAME_SIZE) & ~15) - 8
    resume = resume_regs(regs)
    ctx = struct.pack(f"<{len(SIGCONTEXT_REGS)}Q", *(getattr(resume, r) for r in SIGCONTEXT_REGS))
    ctx += _SEGMENTS.pack(resume.cs, resume.gs, resume.fs, resume.ss)
    ctx += bytes(4 * 8)  # err, trapno, oldmask, cr2 (then fpstate at _FPSTATE_AT)
    ctx += struct.pack("<Q", fpstate) + bytes(8 * 8)
    flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    if len(fp) > FXSAVE_SIZE:
        flags |= UC_FP_XSTATE
    head = struct.pack("<QQQ", restorer, flags, 0)
    head += struct.pack("<QI4xQ", 0, SS_INVALID, 0)  # uc_stack
    head += ctx + struct.pack("<Q", sigmask)
    head += bytes(FRAME_SIZE - len(head))  # siginfo
    data = bytearray(top - sp)
    data[0 : len(head)] = head
    data[arg_at - sp : arg_at - sp + len(arg)] = arg
    data[fpstate - sp : fpstate - sp + len(fp)] = fp
    return Frame(sp, bytes(data), sp, arg_at, fpstate)
