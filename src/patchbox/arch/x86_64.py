"""x86-64: every fact of the architecture patchbox uses, as data.

- the relocation types of the psABI (System V AMD64 ABI, table 4.9; ``CODE_4_*`` from
  the APX extension, emitted by newer assemblers), with the pc-relative property and the
  :class:`Recipe` by which :mod:`patchbox.extract` turns each into patch fix-ups; types
  without a recipe are refused by name (``UnsupportedRelocation``);
- the patchable entry of ``-fpatchable-function-entry=8,6`` (6 one-byte NOPs before the
  symbol, 2 at it) and the ``endbr64`` landing pad an entry jump stays behind;
- branches: ``jmp rel32`` (``e9``), ``call rel32`` (``e8``), ``jcc rel32`` (``0f 8x``),
  reaching ±2 GiB; the import stub ``jmp *slot(%rip)``;
- capstone's ``CS_ARCH_X86`` / ``CS_MODE_64``;
- ``struct user_regs_struct`` (sys/user.h) and the system call ABI;
- thread-local storage variant II and its dynamic relocations;
- the signal frame of a borrowed thread (:mod:`patchbox.arch.x86_64_sigframe`).
"""

from __future__ import annotations

from patchbox.arch import x86_64_sigframe as _sigframe
from patchbox.arch.model import (
    Arch,
    Branches,
    Calc,
    Disasm,
    EntryLayout,
    Recipe,
    Registers,
    RelocTable,
    RelocType,
    SigFrame,
    TlsFacts,
)
from patchbox.errors import UnsupportedRelocation

__all__ = ["ARCH", "RELOC_TYPES", "ENDBR64", "NOP", "INT3", "jump", "call"]

EM_X86_64 = 62

R = RelocType
P, A = Calc.PREL, Calc.ABS
# Relocations whose field is all the link writes; before the others (GOTPCRELX, ...) the
# linker may rewrite the instruction too (mov -> lea, call * -> addr32 call): field_only.
RELOC_TYPES: dict[str, RelocType] = {
    t.name: t
    for t in (
        R("R_X86_64_NONE", 0, 0, False, Recipe.NONE, field_only=True, calc=Calc.NONE),
        R("R_X86_64_64", 1, 8, False, Recipe.ABS64, field_only=True, debug=True, calc=A),
        R("R_X86_64_PC32", 2, 4, True, Recipe.PCREL, field_only=True, debug=True, calc=P),
        R("R_X86_64_GOT32", 3, 4, False),
        R("R_X86_64_PLT32", 4, 4, True, Recipe.CALL, field_only=True, calc=P),
        R("R_X86_64_COPY", 5, 0, False),
        R("R_X86_64_GLOB_DAT", 6, 8, False),
        R("R_X86_64_JUMP_SLOT", 7, 8, False),
        R("R_X86_64_RELATIVE", 8, 8, False),
        R("R_X86_64_GOTPCREL", 9, 4, True, Recipe.GOT, calc=Calc.GOT),
        R("R_X86_64_32", 10, 4, False, field_only=True, debug=True, calc=A),
        R("R_X86_64_32S", 11, 4, False, field_only=True, debug=True, calc=A),
        R("R_X86_64_16", 12, 2, False),
        R("R_X86_64_PC16", 13, 2, True),
        R("R_X86_64_8", 14, 1, False),
        R("R_X86_64_PC8", 15, 1, True),
        R("R_X86_64_DTPMOD64", 16, 8, False),
        R("R_X86_64_DTPOFF64", 17, 8, False),
        R("R_X86_64_TPOFF64", 18, 8, False),
        R("R_X86_64_TLSGD", 19, 4, True, Recipe.TLS_GD),
        R("R_X86_64_TLSLD", 20, 4, True, Recipe.TLS_LD),
        R("R_X86_64_DTPOFF32", 21, 4, False, Recipe.TLS_DTPOFF),
        R("R_X86_64_GOTTPOFF", 22, 4, True, Recipe.TLS_IE),
        R("R_X86_64_TPOFF32", 23, 4, False, Recipe.TLS_LE, calc=Calc.TPREL),
        R("R_X86_64_PC64", 24, 8, True),
        R("R_X86_64_GOTOFF64", 25, 8, False),
        R("R_X86_64_GOTPC32", 26, 4, True),
        R("R_X86_64_GOT64", 27, 8, False),
        R("R_X86_64_GOTPCREL64", 28, 8, True),
        R("R_X86_64_GOTPC64", 29, 8, True),
        R("R_X86_64_GOTPLT64", 30, 8, False),
        R("R_X86_64_PLTOFF64", 31, 8, False),
        R("R_X86_64_SIZE32", 32, 4, False),
        R("R_X86_64_SIZE64", 33, 8, False),
        R("R_X86_64_GOTPC32_TLSDESC", 34, 4, True, Recipe.TLS_DESC),
        R("R_X86_64_TLSDESC_CALL", 35, 0, False, Recipe.NONE),  # marks the call only
        R("R_X86_64_TLSDESC", 36, 16, False),
        R("R_X86_64_IRELATIVE", 37, 8, False),
        R("R_X86_64_RELATIVE64", 38, 8, False),
        R("R_X86_64_GOTPCRELX", 41, 4, True, Recipe.GOT, calc=Calc.GOT),
        R("R_X86_64_REX_GOTPCRELX", 42, 4, True, Recipe.GOT, calc=Calc.GOT),
        R("R_X86_64_CODE_4_GOTPCRELX", 43, 4, True),
        R("R_X86_64_CODE_4_GOTTPOFF", 44, 4, True),
        R("R_X86_64_CODE_4_GOTPC32_TLSDESC", 45, 4, True),
    )
}
_HINTS = {
    name: "absolute 32-bit address: compile the patch with -fPIE"
    for name in ("R_X86_64_32", "R_X86_64_32S")
}

NOP = 0x90
INT3 = 0xCC
ENDBR64 = bytes.fromhex("f30f1efa")  # CET's landing pad (IBT)

# x86-64 opcodes before a rel32: call (e8), jmp (e9), and jcc (0f 80..8f).
_CALL_REL32, _JMP_REL32 = 0xE8, 0xE9
_TWO_BYTE_ESCAPE = 0x0F
_JCC_REL32 = range(0x80, 0x90)
_REACH = 1 << 31


def _rel32(opcode: int, at: int, to: int) -> bytes:
    disp = to - (at + 5)
    if not -_REACH <= disp < _REACH:
        raise UnsupportedRelocation(
            f"a branch at {at:#x} cannot reach {to:#x}: {disp:+#x} is beyond rel32's ±2 GiB"
        )
    return bytes([opcode]) + disp.to_bytes(4, "little", signed=True)


def jump(at: int, to: int) -> bytes:
    """Returns ``jmp rel32`` at ``at`` to ``to``; raises if ``to`` is beyond ±2 GiB."""
    return _rel32(_JMP_REL32, at, to)


def call(at: int, to: int) -> bytes:
    """Returns ``call rel32`` at ``at`` to ``to``; raises if ``to`` is beyond ±2 GiB."""
    return _rel32(_CALL_REL32, at, to)


def is_branch_field(code: bytes, o: int) -> bool:
    """Returns True if the 4 bytes at ``o`` of ``code`` are the rel32 of a call, jmp or jcc."""
    return o >= 1 and (
        code[o - 1] in (_CALL_REL32, _JMP_REL32)
        or (code[o - 2 : o - 1] == bytes([_TWO_BYTE_ESCAPE]) and code[o - 1] in _JCC_REL32)
    )


# struct user_regs_struct (sys/user.h), in order.
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

# The system calls patchbox names (arch/x86/entry/syscalls/syscall_64.tbl).
SYSCALLS = {
    "read": 0,
    "poll": 7,
    "rt_sigreturn": 15,
    "readv": 19,
    "select": 23,
    "pause": 34,
    "nanosleep": 35,
    "accept": 43,
    "recvfrom": 45,
    "recvmsg": 47,
    "wait4": 61,
    "rt_sigtimedwait": 128,
    "clock_nanosleep": 230,
    "epoll_wait": 232,
    "pselect6": 270,
    "ppoll": 271,
    "epoll_pwait": 281,
    "accept4": 288,
    "epoll_pwait2": 441,
}

ARCH = Arch(
    name="x86_64",
    e_machine=EM_X86_64,
    machine_name="EM_X86_64",
    title="x86-64",
    multiarch="x86_64-linux-gnu",
    ldconfig_tag="x86-64",
    address_size=8,
    relocs=RelocTable("R_X86_64_", RELOC_TYPES, _HINTS),
    entry=EntryLayout(
        pad=6,
        at=2,
        nop=bytes([NOP]),
        landing=ENDBR64,
        fill=bytes([INT3]),
        insn_align=1,
        publish=2,  # eb f8: jmp to the rel32 jump at entry-6
    ),
    branches=Branches(
        jump_len=5,
        reach=_REACH,
        jump=jump,
        call=call,
        is_branch_field=is_branch_field,
        stub=b"\xff\x25\x00\x00\x00\x00",  # jmp *slot(%rip), the slot right after it
        stub_size=16,  # then the 8-byte slot and two int3
        stub_slot=6,
        call_mnemonics=("call",),
        jump_mnemonics=("jmp",),
        stop_prefixes=("j", "ret"),
        call_field=1,
    ),
    disasm=Disasm("CS_ARCH_X86", "CS_MODE_64", "capstone.x86:X86_OP_"),
    registers=Registers(
        names=_REG_NAMES,
        pc="rip",
        sp="rsp",
        ret="rax",
        args=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
        syscall_args=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
        syscall_nr="orig_rax",
        flags="eflags",
        fp_regset=0x202,  # NT_X86_XSTATE: the XSAVE area, with the kernel's sw_reserved bytes
        syscall_insn=_sigframe.SYSCALL_INSN,
        shadow_stack=("x86_Thread_features", "shstk"),  # CET user shadow stack
    ),
    tls=TlsFacts(
        dtpmod="R_X86_64_DTPMOD64",
        dtpoff="R_X86_64_DTPOFF64",
        tpoff="R_X86_64_TPOFF64",
        desc="R_X86_64_TLSDESC",
        variant=2,
    ),
    syscalls=SYSCALLS,
    pcrel_bias=4,
    section_types={0x70000001: "SHT_AMD64_UNWIND"},
    relax_before=4,  # mov -> lea, call * -> addr32 call
    sigframe=SigFrame(
        rt_sigreturn=_sigframe.RT_SIGRETURN,
        restorer=_sigframe.RESTORER,
        fix_flags=_sigframe.FIX_EFLAGS,
        red_zone=128,
        build=_sigframe.build_frame,
        restored=_sigframe.restored,
        resume=_sigframe.resume_regs,
    ),
)
