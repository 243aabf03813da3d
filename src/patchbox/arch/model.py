"""The shape of an architecture description (:class:`Arch`) and of its parts: the
relocation table (:class:`RelocType`, :class:`RelocTable`, :class:`Recipe`), the
patchable entry (:class:`EntryLayout`), branches (:class:`Branches`), the disassembler
(:class:`Disasm`), the ptrace registers (:class:`Registers`), thread-local storage
(:class:`TlsFacts`) and the signal frame of a borrowed thread (:class:`SigFrame`).

The modules of this room fill them in, one per architecture; every other room asks the
:class:`Arch` of the binary it works on (:func:`patchbox.arch.get_arch_by_machine`) and
never names an architecture itself (tests/test_arch_confined.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from patchbox.errors import UnsupportedRelocation
from patchbox.wire import FixupType

if TYPE_CHECKING:
    from capstone import Cs, CsInsn

__all__ = [
    "Recipe",
    "TLS_MODELS",
    "Calc",
    "RelocType",
    "RelocTable",
    "EntryLayout",
    "Branches",
    "Disasm",
    "Registers",
    "RegisterFile",
    "Frame",
    "SigFrame",
    "TlsFacts",
    "Arch",
]


class Recipe(Enum):
    """How one relocation becomes fix-ups (docs/patch-format.md, "How extract-patch
    fills it")."""

    NONE = "none"  # nothing to write
    PCREL = "pcrel"  # int32 S + A - P: PC32 to the target; to an import only from call/jmp
    # The low 12 bits of the target's address in an instruction (the second half of an
    # ADRP pair): reached as PCREL reaches it, never an import's.
    LO12 = "lo12"
    CALL = "call"  # like PCREL, but a call/jmp: an import goes through a stub in text
    GOT = "got"  # int32 G + A - P: PC32 to an 8-byte GOT slot in text, slot ABS64 to target
    ABS64 = "abs64"  # uint64 S + A: ABS64 with the target's base
    # Thread-local accesses (patchbox.extract.tls): the variable is the running program's,
    # reached as the program's own code reaches it.
    TLS_LE = "tls_le"  # int32 TP offset of the variable: a constant, executables only
    TLS_IE = "tls_ie"  # int32 G + A - P: PC32 to a slot holding the TP offset
    TLS_GD = "tls_gd"  # int32 pc-relative to a {module id, offset} pair: PC32 to the binary's
    TLS_LD = "tls_ld"  # int32 pc-relative to the module's {module id, 0} pair: PC32 to the binary's
    TLS_DTPOFF = "tls_dtpoff"  # int32 offset of the variable in its module's block: a constant
    TLS_DESC = "tls_desc"  # int32 pc-relative to a TLS descriptor: PC32 to the binary's


#: The access model each thread-local recipe belongs to, as messages name it.
TLS_MODELS: dict[Recipe, str] = {
    Recipe.TLS_LE: "local-exec",
    Recipe.TLS_IE: "initial-exec",
    Recipe.TLS_GD: "general-dynamic",
    Recipe.TLS_LD: "local-dynamic",
    Recipe.TLS_DTPOFF: "local-dynamic",
    Recipe.TLS_DESC: "general-dynamic through a descriptor",
}


class Calc(Enum):
    """The value a relocation puts in its field, in the ABI's notation (S the symbol's
    address, A the addend, P the place, G the address of the symbol's GOT entry, TP
    the thread pointer, Page(x) = x & ~0xfff)."""

    NONE = "none"  # nothing
    ABS = "S + A"
    PREL = "S + A - P"
    PAGE = "Page(S + A) - Page(P)"
    GOT = "G + A - P"  # a pc-relative GOT reference as one field
    GOT_PAGE = "Page(G(S)) - Page(P)"
    GOT_LO12 = "G(S)"  # low bits of the GOT entry's address
    TPREL = "S + A - TP"  # offset from the thread pointer (local-exec)
    TLS_GOT_PAGE = "Page(G(TPREL(S + A))) - Page(P)"  # initial-exec: the TP-offset slot
    TLS_GOT_LO12 = "G(TPREL(S + A))"
    TLSDESC_PAGE = "Page(G(TLSDESC(S + A))) - Page(P)"  # the descriptor's page
    TLSDESC_LO12 = "G(TLSDESC(S + A))"
    TLSGD_PAGE = "Page(G(GTLSIDX(S, A))) - Page(P)"  # the {module id, offset} pair's page
    TLSGD_LO12 = "G(GTLSIDX(S, A))"
    OTHER = "other"  # a value patchbox does not compute


#: An instruction field encoder: (the 32-bit instruction word, the value) -> the word
#: with the value in its field; raises UnsupportedRelocation if the value does not fit.
Encoder = Callable[[int, int], int]


@dataclass(frozen=True)
class RelocType:
    """One relocation type of an architecture's psABI."""

    name: str
    number: int
    size: int  # bytes of the field written at the place (4: one instruction word)
    pcrel: bool  # the value is relative to the place
    recipe: Recipe | None = None  # None: a live patch cannot carry it
    # The linker writes the field and nothing else (no instruction rewrite around it).
    field_only: bool = False
    # Debug sections carry it in relocatable objects (patchbox.elf.dwarf applies it).
    debug: bool = False
    calc: Calc = Calc.OTHER
    # None: the value is a little-endian integer of ``size`` bytes; else the field of
    # an instruction word.
    encode: Encoder | None = None
    # The patch's fix-up type that writes the field (wire/constants.toml [fixup_type]);
    # None: PC32, or ABS64 for the ABS64 recipe (data words, every architecture's).
    fixup: FixupType | None = None

    @property
    def field_fixup(self) -> FixupType:
        """Returns the fix-up type that writes this relocation's field in a patch."""
        if self.fixup is not None:
            return self.fixup
        return FixupType.ABS64 if self.recipe is Recipe.ABS64 else FixupType.PC32

    @property
    def is_tls(self) -> bool:
        """Returns True for a thread-local relocation."""
        return any(k in self.name for k in ("TLS", "TPOFF", "TPREL", "DTP"))


@dataclass(frozen=True)
class RelocTable:
    """The relocation types of one architecture, keyed by name (style of pyelftools'
    ``ENUM_RELOC_TYPE_*``) and by number."""

    prefix: str  # R_X86_64_, R_AARCH64_
    types: Mapping[str, RelocType]
    # Why a named type a live patch cannot carry is refused, beyond the generic message.
    hints: Mapping[str, str] = field(default_factory=dict)
    _by_number: dict[int, RelocType] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._by_number.update({t.number: t for t in self.types.values()})

    def __getitem__(self, name: str) -> RelocType:
        return self.types[name]

    def __iter__(self) -> Iterator[RelocType]:
        return iter(self.types.values())

    def get(self, rtype: int) -> RelocType | None:
        """Returns the entry of relocation number ``rtype``, None if unknown."""
        return self._by_number.get(rtype)

    def name(self, rtype: int) -> str:
        """Returns the ELF name of relocation number ``rtype`` (or a numbered placeholder)."""
        known = self._by_number.get(rtype)
        return known.name if known else f"{self.prefix}<{rtype}>"

    def get_carried(self, rtype: int, where: str, target: str) -> RelocType:
        """Returns the entry of ``rtype`` if a live patch can carry it; raises
        UnsupportedRelocation naming type and place otherwise.

        ``where`` is the place of the relocation (``.text.foo+0x12``), ``target`` the
        symbol it refers to; both go into the message.
        """
        known = self._by_number.get(rtype)
        if known is not None and known.recipe is not None:
            return known
        raise UnsupportedRelocation(
            f"unsupported relocation {self.name(rtype)} in {where} against {target!r}"
            + self._hint(rtype)
        )

    def _hint(self, rtype: int) -> str:
        name = self.name(rtype)
        if name in self.hints:
            return f" ({self.hints[name]})"
        known = self._by_number.get(rtype)
        if known is not None and known.is_tls or any(k in name for k in ("TLS", "TP", "DTP")):
            return (
                " (a thread-local access a live patch cannot carry: compile the fix with the "
                "flags of the running program, whose accesses are initial-exec or local-exec in "
                "an executable, general- or local-dynamic in a shared library)"
            )
        return ""


@dataclass(frozen=True)
class EntryLayout:
    """The patchable entry of ``patchbox config --cflags``
    (``-fpatchable-function-entry=N,M``): ``pad`` bytes of NOPs before the symbol, ``at``
    bytes at it; and the landing pad a function may start with, left in place."""

    pad: int  # bytes of NOPs before the symbol (M instructions)
    at: int  # bytes of NOPs at the symbol ((N - M) instructions)
    nop: bytes  # one NOP instruction
    landing: bytes  # the landing pad kept before a jump (endbr / bti), b"" if none
    fill: bytes  # what pads code between copied functions (traps if run)
    insn_align: int  # every instruction starts at a multiple of this
    publish: int  # bytes of the one store at the symbol that publishes a redirect
    # The compiler may put the landing pad at the symbol, before the NOPs there, and a
    # patchable-entry redirect stays behind it (the function record's skip).
    landing_in_entry: bool = False
    # Compile flags the entry needs beyond ``flag`` (``patchbox config --cflags``).
    cflags: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """Returns the compiler flag that makes this entry."""
        n = (self.pad + self.at) // len(self.nop)
        return f"-fpatchable-function-entry={n},{self.pad // len(self.nop)}"

    @property
    def nops(self) -> bytes:
        """Returns the bytes of the whole entry: pad before the symbol, then at it."""
        return self.nop * ((self.pad + self.at) // len(self.nop))

    @property
    def skip(self) -> int:
        """Returns the bytes of the landing pad an entry jump stays behind."""
        return len(self.landing)

    def padded_skip(self, code: bytes) -> int | None:
        """Returns the skip of a patchable entry whose bytes from symbol - ``pad`` are
        ``code``: 0, or the landing pad's length where the compiler put one between the
        NOPs before the symbol and the NOPs at it (aarch64's ``bti c``); None if ``code``
        is no patchable entry."""
        before, at = self.nop * (self.pad // len(self.nop)), self.nop * (self.at // len(self.nop))
        if code[: len(self.nops)] == self.nops:
            return 0
        if self.landing_in_entry and code.startswith(before + self.landing + at):
            return len(self.landing)
        return None


@dataclass(frozen=True)
class Branches:
    """Direct branches: the jump the redirect writes, and how far a branch reaches."""

    jump_len: int  # bytes of the jump an entry jump writes
    reach: int  # a direct jump or call reaches [at - reach, at + reach)
    jump: Callable[[int, int], bytes]  # (at, to) -> the bytes of a jump at ``at`` to ``to``
    call: Callable[[int, int], bytes]  # (at, to) -> the bytes of a call
    # (code, offset) -> whether a relocation at ``offset`` of code is a branch's field
    is_branch_field: Callable[[bytes, int], bool]
    # An import stub: bytes that jump through the 8-byte slot at ``stub_slot``.
    stub: bytes
    stub_size: int
    stub_slot: int
    call_mnemonics: tuple[str, ...]  # mnemonics of a direct call
    jump_mnemonics: tuple[str, ...]  # mnemonics of an unconditional direct jump
    # mnemonic prefixes that end a straight run of code (conditional jumps, returns)
    stop_prefixes: tuple[str, ...]
    call_field: int  # offset of a call's relocation field in its instruction
    # The fix-up of a direct call or jump the assembler resolved (no relocation), bound
    # to the running program: its field is at the instruction's end - 4.
    fixup: FixupType = FixupType.PC32
    # Why an entry jump may not overwrite the first instruction ``insn`` (its bytes),
    # None if it may: where the architecture allows a store over an instruction another
    # core executes only between some instructions (aarch64: NOP, B, ...).
    jump_over_unsafe: Callable[[bytes], str | None] | None = None


@dataclass(frozen=True)
class Disasm:
    """Capstone's names for the architecture and its operand kinds, looked up when
    first used (capstone takes ~80 ms to import: commands that disassemble nothing do
    not pay it)."""

    cs_arch: str  # CS_ARCH_* of capstone
    cs_mode: str  # CS_MODE_* of capstone
    ops: str  # the module of the operand types (capstone.x86) and their prefix (X86_OP_)

    def _const(self, name: str) -> int:
        module, _, prefix = self.ops.partition(":")
        if name.startswith("CS_"):
            return int(getattr(importlib.import_module("capstone"), name))
        return int(getattr(importlib.import_module(module), prefix + name))

    @property
    def op_imm(self) -> int:
        """Returns capstone's operand type of an immediate."""
        return self._const("IMM")

    @property
    def op_reg(self) -> int:
        """Returns capstone's operand type of a register."""
        return self._const("REG")

    @property
    def op_mem(self) -> int:
        """Returns capstone's operand type of a memory reference."""
        return self._const("MEM")

    def disassembler(self, detail: bool = False) -> Cs:
        """Returns a new capstone disassembler (with operand details if ``detail``)."""
        from capstone import Cs

        md = Cs(self._const(self.cs_arch), self._const(self.cs_mode))
        md.detail = detail
        return md

    def branch_target(self, insn: CsInsn) -> int | None:
        """Returns the target of a direct jump or call ``insn`` (disassembled with
        detail), None for an indirect one or another instruction."""
        from capstone import CS_GRP_CALL, CS_GRP_JUMP

        if not (insn.group(CS_GRP_JUMP) or insn.group(CS_GRP_CALL)) or not insn.operands:
            return None
        for op in insn.operands:
            if op.type == self.op_imm:
                return int(op.imm)
        return None

    def mem_key(self, op: Any) -> tuple[int, ...]:
        """Returns what identifies a memory operand (base, index, scale, displacement)."""
        m = op.mem
        return (m.base, m.index, getattr(m, "scale", 1), m.disp)


class RegisterFile(Protocol):
    """A thread's general registers as ptrace reads them (``patchbox.reach.ptrace.Regs``):
    fields by their kernel names."""

    def copy(self) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...

    def __setattr__(self, name: str, value: Any) -> None: ...


@dataclass(frozen=True)
class Registers:
    """The ptrace view of a thread: the register set ``PTRACE_GETREGS`` (or
    ``GETREGSET NT_PRSTATUS``) reads, in order, all 8-byte fields, and which is which."""

    names: tuple[str, ...]
    pc: str
    sp: str
    ret: str  # a function's return value; a system call's result
    args: tuple[str, ...]  # a function call's arguments
    syscall_args: tuple[str, ...]  # a system call's arguments
    syscall_nr: str  # the number of the system call in progress (-1: none)
    flags: str  # the flags register
    fp_regset: int  # the NT_* note of the FP/vector state for PTRACE_GETREGSET
    syscall_insn: bytes  # the system call instruction, just behind the pc of a stopped call
    # /proc/PID/task/TID/status: (key, word) whose presence means returns are checked by
    # a shadow stack; None where the architecture has none.
    shadow_stack: tuple[str, str] | None = None


@dataclass(frozen=True)
class Frame:
    """Bytes to write at ``addr`` (below the thread's red zone): the signal frame at
    ``sp`` (the stack pointer of the call, its return address there), the call's string
    argument at ``arg``, the FP state at ``fpstate``."""

    addr: int
    data: bytes
    sp: int
    arg: int
    fpstate: int


@dataclass(frozen=True)
class SigFrame:
    """The signal frame that brings a borrowed thread back by itself
    (docs/reach.md, "Attach")."""

    rt_sigreturn: int  # its system call number
    restorer: bytes  # glibc's __restore_rt: the return address of the injected call
    fix_flags: int  # the flags sigreturn takes from the frame
    red_zone: int
    build: Callable[..., Frame]  # (regs, fpstate, sigmask, restorer, arg, red_zone=) -> Frame
    restored: Callable[[RegisterFile], dict[str, int]]
    resume: Callable[[RegisterFile], RegisterFile]


@dataclass(frozen=True)
class TlsFacts:
    """Thread-local storage: the dynamic relocations the loader fills GOT entries with."""

    dtpmod: str  # module id of a {module id, offset} pair
    dtpoff: str  # offset in the module's block
    tpoff: str  # offset from the thread pointer (initial-exec)
    desc: str  # a TLS descriptor {resolver, argument}
    # Variant I (aarch64: blocks after a TCB of ``tcb_size`` bytes at TP) or II (x86-64:
    # the executable's block ends at TP).
    variant: int
    tcb_size: int = 0


@dataclass(frozen=True)
class Arch:
    """Everything patchbox knows of one architecture."""

    name: str  # as `uname -m` says it
    e_machine: int  # ELF header e_machine
    machine_name: str  # pyelftools' name of e_machine
    title: str  # as messages name it
    multiarch: str  # Debian's multiarch triplet (library directories)
    ldconfig_tag: str  # how `ldconfig -p` marks libraries of this architecture
    address_size: int
    relocs: RelocTable
    entry: EntryLayout
    branches: Branches
    disasm: Disasm
    registers: Registers
    tls: TlsFacts
    syscalls: Mapping[str, int]
    # What a pc-relative addend carries beyond the distance to its target: a rel32 field
    # ends its instruction on x86-64, so the addend there is the distance minus 4.
    pcrel_bias: int = 0
    # The processor-specific section types (SHT_LOPROC..), by pyelftools' names.
    section_types: Mapping[int, str] = field(default_factory=dict)
    # Bytes before a relocation field the linker may rewrite with it (relaxing a GOT
    # load to an address computation); within one instruction word: 0.
    relax_before: int = 0
    sigframe: SigFrame | None = None  # None: attach cannot borrow a thread here

    @property
    def fixup_types(self) -> frozenset[FixupType]:
        """Returns the patch fix-up types of this architecture: the data words every one
        has (PC32, ABS64) and those writing its relocations' and branches' fields."""
        fields = {t.field_fixup for t in self.relocs if t.recipe not in (None, Recipe.NONE)}
        return frozenset({FixupType.PC32, FixupType.ABS64, self.branches.fixup, *fields})
