"""What comparing two objects produces: canonical forms, decisions, one object's diff.

Every value here is immutable: a decision, once made, is not edited; later passes
(:mod:`patchbox.pipeline`) derive new values from it.

The *canonical form* of a byte range (a function, a variable) is its bytes with every
relocation field zeroed, plus its relocations, each described by what it names rather
than by symbol index or label (docs/build.md, "How objects are compared"). Two forms
are equal exactly when the two ranges do the same thing. Forms are named tuples: a
QEMU-sized comparison builds and compares millions of them, and a tuple is made and
compared in C.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Verdict",
    "ItemKind",
    "Decision",
    "ObjectDiff",
    "TargetKind",
    "RelocTarget",
    "FormReloc",
    "CanonicalForm",
    "Cycle",
]


class Verdict(StrEnum):
    """What happens to one symbol of a patched object (the ``--explain`` column)."""

    IN = "in"  # replaced: an existing function whose code changed
    OUT = "out"  # left alone: unchanged, or a difference that is not a change
    CARRIED = "carried"  # copied into the patch if the new code uses it, never redirected
    REFUSED = "refused"  # code replacement cannot do it: the whole patch is refused


class ItemKind(StrEnum):
    """What a decision is about."""

    FUNCTION = "function"
    VARIABLE = "variable"
    TYPE = "type"  # a struct or union layout (from DWARF)


@dataclass(frozen=True)
class Decision:
    """Why one symbol of a patched object is in the patch, out of it, or refused."""

    symbol: str
    what: ItemKind
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class ObjectDiff:
    """The comparison of one object file: its decisions, and what they select."""

    rel: str  # path relative to the build tree (or the object's name)
    patched: Path
    orig: Path | None  # None: a new object file
    source: str | None  # the patched object's source file (STT_FILE)
    decisions: tuple[Decision, ...] = ()
    functions: tuple[str, ...] = ()  # changed functions the original has: to replace
    clones: frozenset[str] = frozenset()  # changed GCC clones: copied, never linked
    new_globals: frozenset[str] = frozenset()  # defined here, absent from the original

    @property
    def refusals(self) -> list[str]:
        """Returns ``symbol: reason`` of every refused decision."""
        return [f"{d.symbol}: {d.reason}" for d in self.decisions if d.verdict is Verdict.REFUSED]


class TargetKind(StrEnum):
    """What a relocation of a canonical form names."""

    ABS = "abs"  # an absolute value (``value``)
    EXTERNAL = "ext"  # a symbol of another object or a library (``name``, addend ``value``)
    SYMBOL = "sym"  # a function or variable of this object, by its paired name
    STRING = "str"  # a string literal: its bytes (``data``; a path by its basename)
    CONSTANT = "cst"  # a mergeable constant: its bytes (``data``)
    READ_ONLY = "ro"  # a read-only static object: its own form (``form``), addend
    ANONYMOUS = "anon"  # anonymous read-only data: its own form, offset ``value``

    def describe(self) -> str:
        """Returns how ``--explain`` names a target of this kind (not SYMBOL or EXTERNAL,
        which are named by their symbol, nor STRING, by its text)."""
        return _DESCRIBED.get(self, self.value)


_SHOWN = 40  # characters of a string constant a reason shows at most
_DESCRIBED = {
    TargetKind.CONSTANT: "a constant",
    TargetKind.READ_ONLY: "read-only data",
    TargetKind.ANONYMOUS: "anonymous data",
    TargetKind.ABS: "an absolute value",
}


class Cycle(NamedTuple):
    """Stands for a form still being built when a range refers back to itself (a table
    of pointers into itself): its section's name and the range's start."""

    section: str
    start: int


class RelocTarget(NamedTuple):
    """What one relocation points to, independently of labels and symbol numbers."""

    kind: TargetKind
    name: str = ""  # SYMBOL, EXTERNAL
    data: bytes = b""  # STRING, CONSTANT
    value: int = 0  # the addend (SYMBOL, EXTERNAL, READ_ONLY, ANONYMOUS) or the value (ABS)
    form: CanonicalForm | Cycle | None = None  # READ_ONLY, ANONYMOUS

    def describe(self) -> str:
        """Returns how ``--explain`` names this target in a reason."""
        if self.kind in (TargetKind.EXTERNAL, TargetKind.SYMBOL):
            return self.name
        if self.kind is TargetKind.STRING:
            s = self.data.decode(errors="replace")
            return repr(s if len(s) <= _SHOWN else s[: _SHOWN - len("...")] + "...")
        return self.kind.describe()

    def string(self) -> str | None:
        """Returns the text this target points to if it is a string: a string literal,
        or a read-only object holding one (as ``__func__`` is); else None."""
        if self.kind is TargetKind.STRING:
            return self.data.decode(errors="replace")
        form = self.form
        if self.kind is TargetKind.READ_ONLY and isinstance(form, CanonicalForm):
            data = form.code
            if form.bss is None and data.endswith(b"\0") and b"\0" not in data[:-1]:
                return data[:-1].decode(errors="replace")
        return None


class FormReloc(NamedTuple):
    """One relocation of a canonical form: where it is (from the range's start), its
    ELF type, and what it names."""

    offset: int
    type: int
    target: RelocTarget


class CanonicalForm(NamedTuple):
    """A byte range in canonical form: ``code`` with every relocation field zeroed and
    ``relocs``; a zero-initialised (bss) range has no bytes, only ``bss``, its size."""

    code: bytes
    relocs: tuple[FormReloc, ...] = ()
    bss: int | None = None
