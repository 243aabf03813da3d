"""The signal frame a borrowed thread returns through (patchbox.arch.x86_64_sigframe): its
layout checked against the C headers (glibc's ucontext_t, the kernel's sigcontext and
XSAVE sw bytes, compiled here), the restart rules of the kernel, and what a built frame
holds where."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from patchbox.arch.x86_64_sigframe import (
    FIX_EFLAGS,
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    FRAME_OFFSETS,
    FXSAVE_SIZE,
    RESTORER,
    SIGCONTEXT_REGS,
    SW_RESERVED,
    build_frame,
    restored,
    resume_regs,
)
from patchbox.reach.ptrace import Regs

LAYOUT = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/ucontext.h>
int main(void) {
    /* The kernel's rt_sigframe is {char *pretcode; struct ucontext uc; siginfo}: glibc's
     * ucontext_t has the kernel's layout up to uc_sigmask. */
    printf("uc_flags %zu\n", 8 + offsetof(ucontext_t, uc_flags));
    printf("uc_link %zu\n", 8 + offsetof(ucontext_t, uc_link));
    printf("uc_stack %zu\n", 8 + offsetof(ucontext_t, uc_stack));
    printf("uc_mcontext %zu\n", 8 + offsetof(ucontext_t, uc_mcontext));
    printf("uc_sigmask %zu\n", 8 + offsetof(ucontext_t, uc_sigmask));
    printf("ss_flags %zu\n", offsetof(stack_t, ss_flags));
    printf("ss_size %zu\n", offsetof(stack_t, ss_size));
    printf("fpstate %zu\n", offsetof(struct sigcontext, fpstate));
    printf("sigcontext %zu\n", sizeof(struct sigcontext));
    printf("siginfo %zu\n", sizeof(siginfo_t));
    /* The kernel's sw_reserved[12] is the last 12 words of glibc's reserved[24]. */
    printf("sw_reserved %zu\n", offsetof(struct _fpstate, __glibc_reserved1) + 12 * 4);
    printf("fxsave %zu\n", sizeof(struct _fpstate));
    printf("magic1 %u\n", FP_XSTATE_MAGIC1);
    printf("magic2 %u\n", FP_XSTATE_MAGIC2);
    printf("SS_ONSTACK %d SS_DISABLE %d\n", SS_ONSTACK, SS_DISABLE);
#define REG(name, field) printf("reg %s %zu\n", name, offsetof(struct sigcontext, field))
    REG("r8", r8); REG("r9", r9); REG("r10", r10); REG("r11", r11); REG("r12", r12);
    REG("r13", r13); REG("r14", r14); REG("r15", r15); REG("rdi", rdi); REG("rsi", rsi);
    REG("rbp", rbp); REG("rbx", rbx); REG("rdx", rdx); REG("rax", rax); REG("rcx", rcx);
    REG("rsp", rsp); REG("rip", rip); REG("eflags", eflags); REG("cs", cs); REG("ss", __pad0); /* the kernel calls it ss */
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Returns the offsets and constants the C headers give."""
    d = tmp_path_factory.mktemp("sigframe")
    (d / "layout.c").write_text(LAYOUT)
    subprocess.run(["gcc", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out: dict[str, int] = {}
    for line in subprocess.run(
        [str(d / "layout")], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        words = line.split()
        if words[0] == "reg":
            out[f"reg {words[1]}"] = int(words[2])
        else:
            for name, value in zip(words[::2], words[1::2], strict=True):
                out[name] = int(value)
    return out


def test_frame_layout_is_the_kernels(c_layout: dict[str, int]) -> None:
    for field, at in FRAME_OFFSETS.items():
        if field in c_layout:
            assert at == c_layout[field], field
    assert FRAME_OFFSETS["info"] == FRAME_OFFSETS["uc_sigmask"] + 8  # the kernel's sigset
    assert c_layout["sigcontext"] == 256 and c_layout["siginfo"] == 128
    assert c_layout["ss_flags"] == 8 and c_layout["ss_size"] == 16
    assert [c_layout[f"reg {r}"] for r in SIGCONTEXT_REGS] == [8 * i for i in range(18)]
    assert (c_layout["reg cs"], c_layout["reg ss"]) == (144, 150)
    assert (c_layout["sw_reserved"], c_layout["fxsave"]) == (SW_RESERVED, FXSAVE_SIZE)
    assert (c_layout["magic1"], c_layout["magic2"]) == (FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2)


def test_the_restorer_is_glibcs_restore_rt(tmp_path: Path) -> None:
    """`mov $15, %rax; syscall`, as objdump decodes it (and found in this libc)."""
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    assert RESTORER in libc.read_bytes()
    (tmp_path / "insn").write_bytes(RESTORER)
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", str(tmp_path / "insn")],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert "mov    $0xf,%rax" in out and "syscall" in out


def regs(**values: int) -> Regs:
    r = Regs()
    for i, name in enumerate(SIGCONTEXT_REGS):
        setattr(r, name, 0x1000 + i)
    r.rsp, r.rip, r.cs, r.ss, r.eflags = 0x7FFF0000_1238, 0x7F00_0000_2002, 0x33, 0x2B, 0x246
    for k, v in values.items():
        setattr(r, k, v)
    return r


NEG = 1 << 64


@pytest.mark.parametrize(
    ("rax", "orig_rax", "want_rax", "back"),
    [
        (NEG - 512, 0, 0, 2),  # -ERESTARTSYS from read: made again
        (NEG - 513, 61, 61, 2),  # -ERESTARTNOINTR
        (NEG - 514, 7, 7, 2),  # -ERESTARTNOHAND from poll
        (NEG - 516, 230, 230, 2),  # -ERESTART_RESTARTBLOCK: the call again, not restart_syscall
        (NEG - 4, 232, NEG - 4, 0),  # -EINTR (epoll_wait): returned as it is
        (5, 0, 5, 0),  # a read that had finished: its result
        (NEG - 512, NEG - 1, NEG - 512, 0),  # no system call (orig_rax -1): nothing restarts
    ],
)
def test_resume_follows_the_kernels_restart_rules(
    rax: int, orig_rax: int, want_rax: int, back: int
) -> None:
    r = regs(rax=rax, orig_rax=orig_rax)
    out = resume_regs(r)
    assert (out.rax, out.rip) == (want_rax, r.rip - back)
    assert out.orig_rax == NEG - 1
    assert all(getattr(out, n) == getattr(r, n) for n in SIGCONTEXT_REGS if n not in ("rax", "rip"))


def test_built_frame_holds_the_thread_as_it_resumes() -> None:
    r = regs(rax=NEG - 512, orig_rax=0)
    xstate = bytearray(832)
    struct.pack_into("<IIQI", xstate, SW_RESERVED, FP_XSTATE_MAGIC1, 836, 0x7, 832)
    xstate[160:176] = b"x" * 16  # xmm0
    f = build_frame(r, bytes(xstate), 0x4001, 0x7F00_0003_C050, b"/lib/x.so\0")
    assert (f.sp + 8) % 16 == 0  # a function's entry: the return address pushed
    assert f.sp + len(f.data) == r.rsp - 128  # nothing in the red zone
    assert f.fpstate % 64 == 0 and f.sp < f.arg < f.fpstate

    def at(addr: int, fmt: str) -> tuple[Any, ...]:
        return struct.unpack_from(fmt, f.data, addr - f.sp)

    assert at(f.sp, "<Q")[0] == 0x7F00_0003_C050  # returns into __restore_rt
    assert at(f.arg, "10s")[0] == b"/lib/x.so\0"
    flags, link = at(f.sp + FRAME_OFFSETS["uc_flags"], "<QQ")
    assert flags == 1 | 2 | 4 and link == 0  # FP_XSTATE, SIGCONTEXT_SS, STRICT_RESTORE_SS
    _sp, ss_flags, _size = at(f.sp + FRAME_OFFSETS["uc_stack"], "<QI4xQ")
    assert ss_flags not in (0, 1, 2)  # invalid: sigreturn leaves the alternate stack alone
    ctx = f.sp + FRAME_OFFSETS["uc_mcontext"]
    values = at(ctx, f"<{len(SIGCONTEXT_REGS)}Q")
    want = resume_regs(r)
    assert list(values) == [getattr(want, n) for n in SIGCONTEXT_REGS]
    assert values[SIGCONTEXT_REGS.index("rip")] == r.rip - 2
    assert values[SIGCONTEXT_REGS.index("rax")] == 0  # read's number
    assert at(ctx + 144, "<HHHH") == (0x33, r.gs, r.fs, 0x2B)
    assert at(ctx + 184, "<Q")[0] == f.fpstate
    assert at(f.sp + FRAME_OFFSETS["uc_sigmask"], "<Q")[0] == 0x4001
    assert at(f.fpstate, "832s")[0] == bytes(xstate)
    assert at(f.fpstate + 832, "<I")[0] == FP_XSTATE_MAGIC2


def test_a_legacy_fpu_area_is_carried_alone() -> None:
    """No kernel sw bytes (no XSAVE): 512 bytes of FXSAVE, UC_FP_XSTATE not set."""
    f = build_frame(regs(), bytes(512), 0, 0x1000, b"\0")
    assert struct.unpack_from("<Q", f.data, FRAME_OFFSETS["uc_flags"])[0] & 1 == 0
    assert f.sp + len(f.data) - f.fpstate >= 512


def test_restored_masks_the_flags_sigreturn_does_not_take() -> None:
    want = restored(regs(eflags=0x246 | 0x200000))  # ID flag: the kernel's, not the frame's
    assert want["eflags"] == 0x246 & FIX_EFLAGS
    assert want["rip"] == regs().rip and "orig_rax" not in want
