"""AArch64: the facts of the architecture as data, and its instruction field encoders.

- The relocation types patchbox reads in objects (numbers from the AArch64 ELF ABI,
  "aaelf64", section 5.7), with the pc-relative property and the value each computes
  (:class:`Calc`), and the :class:`Recipe` and patch fix-up type (``RelocType.fixup``) by
  which :mod:`patchbox.extract` carries it: B/BL (CALL26, JUMP26: BRANCH26; an import
  through the veneer stub), ADRP (ADR_PREL_PG_HI21: ADR_PAGE), the low 12 bits (ADD and
  LDSTn ``_ABS_LO12_NC``: ADD_LO12, LDSTn_LO12), the GOT pair (ADR_GOT_PAGE,
  LD64_GOT_LO12_NC: an 8-byte slot the patch carries, as x86-64's GOTPCREL), PREL32
  (PC32), ABS64. The others (ADR, B.cond/CBZ/TBZ, LDR literal and the thread-local ones)
  are refused by name: ``get_carried``.
- The instruction field encoders, pure functions ``(insn, value) -> insn`` that refuse a
  value the field cannot hold (:class:`UnsupportedRelocation`): ``imm26`` of B/BL
  (±128 MiB), ``imm19`` of B.cond/CBZ/LDR literal (±1 MiB), ``imm14`` of TBZ (±32 KiB),
  ADR's 21 bits (±1 MiB), ADRP's page delta (±4 GiB), ADD's ``imm12``, the scaled
  ``imm12`` of loads and stores (the offset a multiple of the access size), the TLS
  ``imm12`` of ``add ..., :tprel_hi12:``. :func:`apply` writes a relocation's value
  into its field, data or instruction, as the linker does (tests/arch/test_aarch64_link.py
  checks it against the bytes ``aarch64-linux-gnu-ld`` writes).
- Branches: ``B``, ``BL``, ``BTI c``, ``NOP``, the veneer ``ldr x16, #8; br x16; .quad``.
- The patchable entry ``-fpatchable-function-entry=5,4`` (docs/decisions.md, "The
  aarch64 entry"): 4 NOPs (16 bytes) before the symbol hold the veneer to the new code,
  the NOP at the symbol (after a ``bti c``) becomes ``B entry-16`` in one aligned 4-byte
  store.
- Capstone's ``CS_ARCH_ARM64``; ``struct user_pt_regs`` (x0..x30, sp, pc, pstate);
  thread-local storage variant I (a 16-byte TCB at TP); the system calls patchbox names.
"""

from __future__ import annotations

from collections.abc import Callable

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
    TlsFacts,
)
from patchbox.errors import UnsupportedRelocation
from patchbox.wire import FixupType

__all__ = [
    "ARCH",
    "RELOC_TYPES",
    "NOP",
    "BTI_C",
    "BRK",
    "VENEER",
    "page",
    "b",
    "bl",
    "veneer",
    "imm26",
    "imm19",
    "imm14",
    "adr",
    "adrp",
    "add_lo12",
    "ldst_lo12",
    "add_hi12",
    "value",
    "apply",
]

EM_AARCH64 = 183

NOP = 0xD503201F
BTI_C = 0xD503245F  # hint #34
BRK = 0xD4200000  # brk #0: fill between functions
_B, _BL = 0x14000000, 0x94000000
_LDR_X16_PC8 = 0x58000050  # ldr x16, #8 (LDR literal, imm19 = 2)
_BR_X16 = 0xD61F0200
VENEER = _LDR_X16_PC8.to_bytes(4, "little") + _BR_X16.to_bytes(4, "little")  # + .quad target
_MIB = 1 << 20


def page(x: int) -> int:
    """Returns the 4 KiB page of address ``x`` (the ABI's ``Page(x)``)."""
    return x & ~0xFFF


def _refuse(what: str, value: int, why: str) -> UnsupportedRelocation:
    return UnsupportedRelocation(f"{what}: {value:+#x} {why}")


def _size(n: int) -> str:
    return f"{n // _MIB} MiB" if n >= _MIB else f"{n // 1024} KiB"


def _branch_imm(insn: int, value: int, bits: int, shift: int, what: str) -> int:
    """Returns ``insn`` with the word offset ``value`` in its ``bits``-bit field at bit
    ``shift``; raises unless ``value`` is 4-aligned and within ±2**(bits+1) bytes."""
    if value & 3:
        raise _refuse(what, value, "is not a multiple of 4 (an instruction's address)")
    limit = 1 << (bits + 1)
    if not -limit <= value < limit:
        raise _refuse(
            what,
            value,
            f"is beyond the ±{_size(limit)} it reaches",
        )
    mask = (1 << bits) - 1
    return (insn & ~(mask << shift)) | (((value >> 2) & mask) << shift)


def imm26(insn: int, value: int) -> int:
    """Returns B/BL ``insn`` reaching ``value`` bytes from itself; raises beyond ±128 MiB
    (CALL26, JUMP26)."""
    return _branch_imm(insn, value, 26, 0, "B/BL offset")


def imm19(insn: int, value: int) -> int:
    """Returns B.cond/CBZ/CBNZ/LDR-literal ``insn`` reaching ``value`` bytes from itself;
    raises beyond ±1 MiB (CONDBR19, LD_PREL_LO19)."""
    return _branch_imm(insn, value, 19, 5, "19-bit pc-relative offset")


def imm14(insn: int, value: int) -> int:
    """Returns TBZ/TBNZ ``insn`` reaching ``value`` bytes from itself; raises beyond
    ±32 KiB (TSTBR14)."""
    return _branch_imm(insn, value, 14, 5, "TBZ/TBNZ offset")


def _immhi_lo(insn: int, imm: int) -> int:
    imm &= (1 << 21) - 1
    return (insn & ~((3 << 29) | (0x7FFFF << 5))) | ((imm & 3) << 29) | ((imm >> 2) << 5)


def adr(insn: int, value: int) -> int:
    """Returns ADR ``insn`` with the byte offset ``value``; raises beyond ±1 MiB
    (ADR_PREL_LO21)."""
    if not -_MIB <= value < _MIB:
        raise _refuse("ADR offset", value, "is beyond the ±1 MiB it reaches")
    return _immhi_lo(insn, value)


def adrp(insn: int, value: int, *, check: bool = True) -> int:
    """Returns ADRP ``insn`` with the page delta ``value`` (``Page(S+A) - Page(P)``, a
    multiple of 4096); raises beyond ±4 GiB unless ``check`` is False (the ``_NC``
    types)."""
    if value & 0xFFF:
        raise _refuse("ADRP page delta", value, "is not a multiple of the 4 KiB page")
    if check and not -(1 << 32) <= value < 1 << 32:
        raise _refuse("ADRP page delta", value, "is beyond the ±4 GiB it reaches")
    return _immhi_lo(insn, value >> 12)


def _imm12(insn: int, imm: int) -> int:
    return (insn & ~(0xFFF << 10)) | ((imm & 0xFFF) << 10)


def add_lo12(insn: int, value: int) -> int:
    """Returns ADD (immediate) ``insn`` with the low 12 bits of ``value``
    (ADD_ABS_LO12_NC, TLSDESC_ADD_LO12, TLSLE_ADD_TPREL_LO12_NC)."""
    return _imm12(insn, value)


def add_lo12_checked(insn: int, value: int) -> int:
    """Returns ADD ``insn`` with ``value``; raises unless 0 <= value < 4096
    (TLSLE_ADD_TPREL_LO12)."""
    if not 0 <= value < 1 << 12:
        raise _refuse("ADD immediate", value, "does not fit 12 bits")
    return _imm12(insn, value)


def add_hi12(insn: int, value: int) -> int:
    """Returns ADD (immediate, ``lsl #12``) ``insn`` with bits 12..23 of ``value``;
    raises unless 0 <= value < 16 MiB (TLSLE_ADD_TPREL_HI12)."""
    if not 0 <= value < 1 << 24:
        raise _refuse("thread-pointer offset", value, "does not fit 24 bits (16 MiB)")
    return _imm12(insn, value >> 12)


def ldst_lo12(size: int) -> Callable[[int, int], int]:
    """Returns the encoder of a load/store of ``size`` bytes: the low 12 bits of the
    value, scaled by ``size``; it raises if they are not a multiple of ``size``
    (LDST8/16/32/64/128_ABS_LO12_NC, LD64_GOT_LO12_NC, the TLS LD64 ones)."""
    shift = size.bit_length() - 1

    def encode(insn: int, value: int) -> int:
        lo = value & 0xFFF
        if lo % size:
            raise _refuse(
                f"{size * 8}-bit load/store offset", lo, f"is not a multiple of {size} bytes"
            )
        return _imm12(insn, lo >> shift)

    encode.__name__ = f"ldst{size * 8}_lo12"
    return encode


def b(at: int, to: int) -> bytes:
    """Returns ``B to`` at ``at``; raises beyond ±128 MiB."""
    return imm26(_B, to - at).to_bytes(4, "little")


def bl(at: int, to: int) -> bytes:
    """Returns ``BL to`` at ``at``; raises beyond ±128 MiB."""
    return imm26(_BL, to - at).to_bytes(4, "little")


def veneer(to: int) -> bytes:
    """Returns the 16-byte veneer to ``to``, any distance away: ``ldr x16, #8; br x16;
    .quad to`` (x16 is IP0, the register the ABI gives veneers; ``br x16`` lands on a
    ``bti c``)."""
    return VENEER + to.to_bytes(8, "little")


def is_branch_field(code: bytes, o: int) -> bool:
    """Returns True if the instruction at ``o`` of ``code`` is a B or BL."""
    if o % 4 or o + 4 > len(code):
        return False
    return int.from_bytes(code[o : o + 4], "little") & 0x7C000000 == _B


def jump_over_unsafe(insn: bytes) -> str | None:
    """Returns why an entry jump (a B, one aligned 4-byte store) may not replace the
    first instruction ``insn``, None if it may: the ARM ARM (B2.2.5) allows a store over
    an instruction another core may be executing only when the old and the new one are
    both among B, BL, NOP, BRK, SVC, HVC, SMC and ISB; the remove writes the original
    back, so it must be a NOP or a B (what the agent checks:
    agent/src/arch/aarch64/insn.h ``sandbox_arch_jump_unsafe``)."""
    word = int.from_bytes(insn[:4], "little")
    if word == NOP or word & 0xFC000000 == _B:
        return None
    return (
        f"its first instruction ({word:08x}) is not a NOP or a B, and the ARM ARM allows an "
        f"instruction another core may be executing to be replaced only among B, BL, NOP, "
        f"BRK, SVC, HVC, SMC and ISB: build with `patchbox config --arch aarch64 --cflags`"
    )


R = RelocType
N = ldst_lo12
PC, LO, CALL, GOT, LE = Recipe.PCREL, Recipe.LO12, Recipe.CALL, Recipe.GOT, Recipe.TLS_LE
# The patch's fix-up types (wire/constants.toml [fixup_type]) writing each field: the agent
# checks the instruction is of the class the type names (agent/src/arch/aarch64/fixup.h).
_B26, _PAGE, _ADD = FixupType.BRANCH26, FixupType.ADR_PAGE, FixupType.ADD_LO12
_L8, _L16, _L32 = FixupType.LDST8_LO12, FixupType.LDST16_LO12, FixupType.LDST32_LO12
_L64, _L128 = FixupType.LDST64_LO12, FixupType.LDST128_LO12
# aaelf64, tables "Static data relocations", "Static AArch64 relocations", "Thread-local
# storage relocations", "Dynamic relocations".
RELOC_TYPES: dict[str, RelocType] = {
    t.name: t
    for t in (
        R("R_AARCH64_NONE", 0, 0, False, Recipe.NONE, calc=Calc.NONE),
        R("R_AARCH64_ABS64", 257, 8, False, Recipe.ABS64, True, True, Calc.ABS),
        R("R_AARCH64_ABS32", 258, 4, False, field_only=True, debug=True, calc=Calc.ABS),
        R("R_AARCH64_ABS16", 259, 2, False, field_only=True, calc=Calc.ABS),
        R("R_AARCH64_PREL64", 260, 8, True, field_only=True, calc=Calc.PREL),
        R("R_AARCH64_PREL32", 261, 4, True, Recipe.PCREL, True, True, Calc.PREL),
        R("R_AARCH64_PREL16", 262, 2, True, field_only=True, calc=Calc.PREL),
        R("R_AARCH64_LD_PREL_LO19", 273, 4, True, calc=Calc.PREL, encode=imm19),
        R("R_AARCH64_ADR_PREL_LO21", 274, 4, True, calc=Calc.PREL, encode=adr),
        R("R_AARCH64_ADR_PREL_PG_HI21", 275, 4, True, PC, calc=Calc.PAGE, encode=adrp, fixup=_PAGE),
        R(
            "R_AARCH64_ADR_PREL_PG_HI21_NC",
            276,
            4,
            True,
            PC,
            calc=Calc.PAGE,
            encode=lambda i, v: adrp(i, v, check=False),
            fixup=_PAGE,
        ),
        R(
            "R_AARCH64_ADD_ABS_LO12_NC",
            277,
            4,
            False,
            LO,
            calc=Calc.ABS,
            encode=add_lo12,
            fixup=_ADD,
        ),
        R("R_AARCH64_LDST8_ABS_LO12_NC", 278, 4, False, LO, calc=Calc.ABS, encode=N(1), fixup=_L8),
        R("R_AARCH64_TSTBR14", 279, 4, True, calc=Calc.PREL, encode=imm14),
        R("R_AARCH64_CONDBR19", 280, 4, True, calc=Calc.PREL, encode=imm19),
        R("R_AARCH64_JUMP26", 282, 4, True, CALL, True, calc=Calc.PREL, encode=imm26, fixup=_B26),
        R("R_AARCH64_CALL26", 283, 4, True, CALL, True, calc=Calc.PREL, encode=imm26, fixup=_B26),
        R(
            "R_AARCH64_LDST16_ABS_LO12_NC",
            284,
            4,
            False,
            LO,
            calc=Calc.ABS,
            encode=N(2),
            fixup=_L16,
        ),
        R(
            "R_AARCH64_LDST32_ABS_LO12_NC",
            285,
            4,
            False,
            LO,
            calc=Calc.ABS,
            encode=N(4),
            fixup=_L32,
        ),
        R(
            "R_AARCH64_LDST64_ABS_LO12_NC",
            286,
            4,
            False,
            LO,
            calc=Calc.ABS,
            encode=N(8),
            fixup=_L64,
        ),
        R(
            "R_AARCH64_LDST128_ABS_LO12_NC",
            299,
            4,
            False,
            LO,
            calc=Calc.ABS,
            encode=N(16),
            fixup=_L128,
        ),
        R(
            "R_AARCH64_ADR_GOT_PAGE",
            311,
            4,
            True,
            GOT,
            calc=Calc.GOT_PAGE,
            encode=adrp,
            fixup=_PAGE,
        ),
        R(
            "R_AARCH64_LD64_GOT_LO12_NC",
            312,
            4,
            False,
            GOT,
            calc=Calc.GOT_LO12,
            encode=N(8),
            fixup=_L64,
        ),
        # General-dynamic (-mtls-dialect=trad): ADRP + ADD of the binary's own GOT pair
        # {module id, offset}, then BL __tls_get_addr (a CALL26 to its import stub).
        R(
            "R_AARCH64_TLSGD_ADR_PAGE21",
            513,
            4,
            True,
            Recipe.TLS_GD,
            calc=Calc.TLSGD_PAGE,
            encode=adrp,
            fixup=_PAGE,
        ),
        R(
            "R_AARCH64_TLSGD_ADD_LO12_NC",
            514,
            4,
            False,
            Recipe.TLS_GD,
            calc=Calc.TLSGD_LO12,
            encode=add_lo12,
            fixup=_ADD,
        ),
        R(
            "R_AARCH64_TLSIE_ADR_GOTTPREL_PAGE21",
            541,
            4,
            True,
            Recipe.TLS_IE,
            calc=Calc.TLS_GOT_PAGE,
            encode=adrp,
            fixup=_PAGE,
        ),
        R(
            "R_AARCH64_TLSIE_LD64_GOTTPREL_LO12_NC",
            542,
            4,
            False,
            Recipe.TLS_IE,
            calc=Calc.TLS_GOT_LO12,
            encode=N(8),
            fixup=_L64,
        ),
        R("R_AARCH64_TLSLE_ADD_TPREL_HI12", 549, 4, False, LE, calc=Calc.TPREL, encode=add_hi12),
        R(
            "R_AARCH64_TLSLE_ADD_TPREL_LO12",
            550,
            4,
            False,
            LE,
            calc=Calc.TPREL,
            encode=add_lo12_checked,
        ),
        R("R_AARCH64_TLSLE_ADD_TPREL_LO12_NC", 551, 4, False, LE, calc=Calc.TPREL, encode=add_lo12),
        # Descriptors (GCC's default for -fPIC): ADRP, LDR of the resolver and ADD of the
        # binary's own descriptor, then BLR through the resolver (TLSDESC_CALL: nothing).
        R(
            "R_AARCH64_TLSDESC_ADR_PAGE21",
            562,
            4,
            True,
            Recipe.TLS_DESC,
            calc=Calc.TLSDESC_PAGE,
            encode=adrp,
            fixup=_PAGE,
        ),
        R(
            "R_AARCH64_TLSDESC_LD64_LO12",
            563,
            4,
            False,
            Recipe.TLS_DESC,
            calc=Calc.TLSDESC_LO12,
            encode=N(8),
            fixup=_L64,
        ),
        R(
            "R_AARCH64_TLSDESC_ADD_LO12",
            564,
            4,
            False,
            Recipe.TLS_DESC,
            calc=Calc.TLSDESC_LO12,
            encode=add_lo12,
            fixup=_ADD,
        ),
        R("R_AARCH64_TLSDESC_CALL", 569, 0, False, Recipe.NONE, calc=Calc.NONE),  # the blr
        R("R_AARCH64_COPY", 1024, 0, False),
        R("R_AARCH64_GLOB_DAT", 1025, 8, False),
        R("R_AARCH64_JUMP_SLOT", 1026, 8, False),
        R("R_AARCH64_RELATIVE", 1027, 8, False),
        R("R_AARCH64_TLS_DTPMOD", 1028, 8, False),
        R("R_AARCH64_TLS_DTPREL", 1029, 8, False),
        R("R_AARCH64_TLS_TPREL", 1030, 8, False),
        R("R_AARCH64_TLSDESC", 1031, 16, False),
        R("R_AARCH64_IRELATIVE", 1032, 8, False),
    )
}
_HINTS = {
    name: "the patch format has no aarch64 fix-up for this field (docs/aarch64.md)"
    for name, t in RELOC_TYPES.items()
    if t.recipe is None and not t.is_tls and t.calc is not Calc.OTHER and t.calc is not Calc.NONE
}

# (low, high) bounds of a data field's value, by (size, pc-relative): aaelf64 checks
# -2**(n-1) <= X < 2**n for ABS32/ABS16/PREL32/PREL16; the 64-bit ones take any value.
_DATA_BOUNDS = {4: (-(1 << 31), 1 << 32), 2: (-(1 << 15), 1 << 16), 8: (-(1 << 63), 1 << 64)}


def value(rtype: RelocType, s: int, a: int, p: int, *, got: int = 0, tp: int = 0) -> int:
    """Returns the value relocation ``rtype`` computes for symbol address ``s``, addend
    ``a`` at place ``p`` (``got``: the address of the GOT entry or descriptor the type
    names; ``tp``: the symbol's offset from the thread pointer); raises for a type
    without a :class:`Calc`."""
    calc = rtype.calc
    if calc is Calc.ABS:
        return s + a
    if calc is Calc.PREL:
        return s + a - p
    if calc is Calc.PAGE:
        return page(s + a) - page(p)
    if calc in (Calc.GOT_PAGE, Calc.TLS_GOT_PAGE, Calc.TLSDESC_PAGE, Calc.TLSGD_PAGE):
        return page(got) - page(p)
    if calc in (Calc.GOT_LO12, Calc.TLS_GOT_LO12, Calc.TLSDESC_LO12, Calc.TLSGD_LO12):
        return got
    if calc is Calc.TPREL:
        return tp + a
    raise UnsupportedRelocation(f"{rtype.name}: patchbox does not compute its value")


def apply(rtype: RelocType, old: bytes, v: int) -> bytes:
    """Returns the ``rtype.size`` bytes ``old`` with value ``v`` written as the linker
    writes it: into the instruction's field, or as a little-endian data word; raises
    UnsupportedRelocation if ``v`` does not fit."""
    if rtype.encode is not None:
        insn = int.from_bytes(old[:4], "little")
        try:
            return rtype.encode(insn, v).to_bytes(4, "little")
        except UnsupportedRelocation as err:
            raise UnsupportedRelocation(f"{rtype.name}: {err}") from err
    lo, hi = _DATA_BOUNDS[rtype.size]
    if not lo <= v < hi:
        raise UnsupportedRelocation(
            f"{rtype.name}: {v:+#x} does not fit its {rtype.size * 8}-bit field"
        )
    return (v & ((1 << (8 * rtype.size)) - 1)).to_bytes(rtype.size, "little")


# struct user_pt_regs (arch/arm64/include/uapi/asm/ptrace.h): x0..x30, sp, pc, pstate.
_REG_NAMES = tuple(f"x{i}" for i in range(31)) + ("sp", "pc", "pstate")

# The system calls patchbox names (include/uapi/asm-generic/unistd.h; aarch64 has no
# poll, select, pause or epoll_wait: ppoll, pselect6, epoll_pwait serve).
SYSCALLS = {
    "epoll_pwait": 22,
    "read": 63,
    "readv": 65,
    "pselect6": 72,
    "ppoll": 73,
    "nanosleep": 101,
    "clock_nanosleep": 115,
    "rt_sigtimedwait": 137,
    "rt_sigreturn": 139,
    "accept": 202,
    "recvfrom": 207,
    "recvmsg": 212,
    "accept4": 242,
    "wait4": 260,
    "epoll_pwait2": 441,
}

ARCH = Arch(
    name="aarch64",
    e_machine=EM_AARCH64,
    machine_name="EM_AARCH64",
    title="AArch64",
    multiarch="aarch64-linux-gnu",
    ldconfig_tag="AArch64",
    address_size=8,
    relocs=RelocTable("R_AARCH64_", RELOC_TYPES, _HINTS),
    entry=EntryLayout(
        pad=16,
        at=4,
        nop=NOP.to_bytes(4, "little"),
        landing=BTI_C.to_bytes(4, "little"),
        fill=BRK.to_bytes(4, "little"),
        insn_align=4,
        publish=4,  # B entry-16, to the veneer in the padding
        landing_in_entry=True,  # bti c at the symbol, the NOP after it (skip 4)
        # The far veneer's literal at entry-8 is 8-aligned when the function is: GCC's
        # own `.p2align 4,,11` skips alignments that cost more than 11 bytes.
        cflags=("-falign-functions=8",),
    ),
    branches=Branches(
        jump_len=4,
        reach=128 * _MIB,
        jump=b,
        call=bl,
        is_branch_field=is_branch_field,
        stub=VENEER,  # ldr x16, #8; br x16; then the 8-byte slot
        stub_size=16,
        stub_slot=8,
        call_mnemonics=("bl",),
        jump_mnemonics=("b",),
        stop_prefixes=("b.", "cb", "tb", "ret", "br"),
        call_field=0,
        fixup=FixupType.BRANCH26,
        jump_over_unsafe=jump_over_unsafe,
    ),
    disasm=Disasm("CS_ARCH_ARM64", "CS_MODE_ARM", "capstone.arm64:ARM64_OP_"),
    registers=Registers(
        names=_REG_NAMES,
        pc="pc",
        sp="sp",
        ret="x0",
        args=tuple(f"x{i}" for i in range(8)),
        syscall_args=tuple(f"x{i}" for i in range(6)),
        syscall_nr="x8",  # NT_ARM_SYSTEM_CALL (0x404) changes it; x8 holds it at entry
        flags="pstate",
        fp_regset=0x2,  # NT_PRFPREG: struct user_fpsimd_state
        syscall_insn=(0xD4000001).to_bytes(4, "little"),  # svc #0
    ),
    tls=TlsFacts(
        dtpmod="R_AARCH64_TLS_DTPMOD",
        dtpoff="R_AARCH64_TLS_DTPREL",
        tpoff="R_AARCH64_TLS_TPREL",
        desc="R_AARCH64_TLSDESC",
        variant=1,
        tcb_size=16,
    ),
    syscalls=SYSCALLS,
    section_types={0x70000003: "SHT_AARCH64_ATTRIBUTES"},
)
