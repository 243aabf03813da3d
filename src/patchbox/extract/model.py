"""The values the extraction passes hand each other (:mod:`patchbox.extract.combine`).

One patched object taking part in a patch is a :class:`Member`: its replaced functions
(:class:`Replaced`, from :func:`patchbox.extract.replaced.find_replaced`) and hooks. The
closure pass (:mod:`patchbox.extract.closure`) turns the members into one
:class:`Closure` each — what is copied and where every relocation goes — and the layout
and emit passes (:mod:`patchbox.extract.emit`) into a :class:`Layout` and an
:class:`Emitted` each. Every value is immutable; no pass edits another's.

The bytes extraction writes (the patchable entry, the padding between functions) are the
object's architecture's: ``ObjectFile.arch`` (:mod:`patchbox.arch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

from patchbox.arch import RelocType
from patchbox.elf.binary import SourceMatch
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.format.model import Fixup
from patchbox.wire import FixupSection, HookKind, RedirectKind

__all__ = [
    "align",
    "SectionKind",
    "TargetKind",
    "Target",
    "Replaced",
    "HookSite",
    "Contribution",
    "Member",
    "Binding",
    "BoundBranch",
    "Closure",
    "Layout",
    "PlacedFixup",
    "Emitted",
]


def align(buf: bytearray, alignment: int, fill: bytes = b"\0") -> None:
    """Pads ``buf`` with copies of ``fill`` (a byte, or an instruction of the
    architecture's code fill) to a multiple of ``alignment``."""
    pad = -len(buf) % max(1, alignment)
    buf += (fill * (pad // len(fill) + 1))[:pad]


class SectionKind(StrEnum):
    """What a copied section is, which says where layout puts it."""

    FUNC = "func"  # code: text, each 16-aligned, replaced functions first
    RODATA = "rodata"  # read-only data: text, after the code
    DATA = "data"  # writable data: data
    BSS = "bss"  # zero-initialised: after the data, only its size is stored

    @classmethod
    def of(cls, sec: Section) -> SectionKind:
        """Returns the kind of section ``sec``."""
        if sec.is_exec:
            return cls.FUNC
        if not sec.is_write:
            return cls.RODATA
        return cls.BSS if sec.is_nobits else cls.DATA


class TargetKind(Enum):
    """Where a relocation's target is, before layout."""

    COPY = "copy"  # a section of this object, copied into the patch
    EXE = "exe"  # a link-time address in the running program
    IMPORT = "import"  # a shared-library symbol
    ABS = "abs"  # an absolute value
    MEMBER = "member"  # a section of another object of the same patch, copied there


@dataclass(frozen=True)
class Target:
    """Where a relocation points: ``value`` is an address (EXE, ABS) or an offset in
    ``section`` (COPY, MEMBER: of the object ``member`` of the patch)."""

    kind: TargetKind
    value: int = 0
    section: int = -1
    symbol: str = ""  # IMPORT only
    member: int = -1  # MEMBER only: index of the defining object in the patch


@dataclass(frozen=True)
class Replaced:
    """One replaced function: its symbol and section in the object, the original's
    link-time address, the bytes the agent expects there and how it is redirected."""

    symbol: ObjSymbol
    section: Section
    address: int
    expected: bytes
    kind: RedirectKind
    skip: int
    held: bool = False  # an entry jump written while the threads are held (HOLD)


@dataclass(frozen=True)
class HookSite:
    """A hook (PATCHBOX_HOOK): when it runs, and the function it names (its code
    section and offset there)."""

    when: HookKind
    section: int
    offset: int


@dataclass(frozen=True)
class Contribution:
    """What one patched object gives a patch: the functions it replaces, and the local
    functions it must copy rather than link to the program's (changed GCC clones, and
    changed functions the program has no out-of-line copy of). An object replacing
    nothing may still supply new globals the others reference. ``original``: the object
    of the build that linked the running program, from the same source (`patchbox
    build`), which tells the object's statics apart where its path cannot
    (:meth:`patchbox.elf.binary.Binary.match_source`)."""

    object: Path
    functions: tuple[str, ...]
    copies: frozenset[str] = frozenset()
    original: Path | None = None


@dataclass(frozen=True)
class Member:
    """One patched object of a patch, before the closure: what it replaces and hooks."""

    index: int  # its place in the patch (text and data are laid out in this order)
    obj: ObjectFile
    names: tuple[str, ...]  # the functions to replace, as asked
    replaced: tuple[Replaced, ...]
    hooks: tuple[HookSite, ...]
    clones: frozenset[str] = frozenset()  # changed GCC clones: copied, never linked
    statics: SourceMatch | None = None  # the binary's unit(s) its statics are; None: none

    @property
    def source(self) -> str | None:
        """Returns the object's source file (STT_FILE): its statics are that file's."""
        return self.obj.source_file


@dataclass(frozen=True)
class Binding:
    """One relocation of copied code or data and the target it gets."""

    section: int
    reloc: Relocation
    rtype: RelocType
    target: Target


@dataclass(frozen=True)
class BoundBranch:
    """A call or jump the assembler resolved inside a shared code section (no
    relocation), bound to the running program: the rel32 field and the target address."""

    section: int
    field: int  # offset of the rel32 in the section
    address: int  # link-time address of the target


@dataclass(frozen=True)
class Closure:
    """One member at the fixed point: every section copied (in the order found), the
    live ranges of shared code sections, and the target of every copied relocation.
    Layout and emit read it; nothing is found after it."""

    copied: tuple[tuple[int, SectionKind], ...]
    live: Mapping[int, frozenset[tuple[int, int]]]  # shared sections; absent: live whole
    bindings: tuple[Binding, ...]
    bound_branches: tuple[BoundBranch, ...]
    # The program's thread-local variables the patch touches: (name, how each is reached).
    tls: tuple[tuple[str, str], ...] = ()

    def is_live(self, section: int, offset: int) -> bool:
        """Returns True if ``offset`` of copied ``section`` is code the patch runs."""
        ranges = self.live.get(section)
        return ranges is None or any(a <= offset < b for a, b in ranges)


@dataclass(frozen=True)
class Layout:
    """One member's copied sections placed: its text and data, their bss size, and
    where each section starts."""

    text: bytes
    data: bytes
    bss_size: int
    placement: Mapping[int, tuple[FixupSection, int]]


@dataclass(frozen=True)
class PlacedFixup:
    """A fix-up of one member, and the member whose text or data its TEXT/DATA base
    means (itself, or another for a cross-object reference)."""

    fixup: Fixup
    into: int


@dataclass(frozen=True)
class Emitted:
    """One member's final bytes (relocation fields zeroed, import stubs and GOT slots
    appended to the text) and its fix-ups, offsets within its own text and data."""

    text: bytes
    data: bytes
    fixups: tuple[PlacedFixup, ...]
