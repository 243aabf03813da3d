"""Thread-local variables reached from a patch: where each access goes.

A live patch never has thread-local variables of its own: every running thread's TLS
block was laid out when the thread started and cannot grow. What it can do is touch the
program's own per-thread variables, the very ones the old code touched, so that counts
continue in every thread (docs/decisions.md, "Thread-local variables"). Each relocation of
a thread-local access model becomes a target the emit pass knows how to write:

======================  =============================  ====================================
access (relocation)     executable                     shared library
======================  =============================  ====================================
local-exec              the TP offset, a constant      refused (not valid in a library)
(``TPOFF32``)           written into the field
initial-exec            own variable: a GOT slot of    the library's own TPOFF64 slot
(``GOTTPOFF``)          the patch holding the TP       for it (PC32, base EXE), else
                        offset; another module's: the  refused
                        program's TPOFF64 slot
general-dynamic         the binary's own pair for it   the library's own pair for it
(``TLSGD``)             (rare: ld relaxes them)        (DTPMOD64/DTPOFF64), else refused
local-dynamic           the binary's {module, 0} pair  the library's {module, 0} pair,
(``TLSLD``,             + offset in the block as a     + offset in the block as a
``DTPOFF32``)           constant                       constant
descriptor              the binary's own descriptor    the library's own descriptor
(``GOTPC32_TLSDESC``)
======================  =============================  ====================================

The offsets and slots come from the reference binary (:mod:`patchbox.elf.tls`); in a
shared library the module id and the offsets from the thread pointer exist only at run
time, in the GOT entries the loader filled, so a patch shares those entries or is
refused, naming the variable, the model and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchbox.arch import TLS_MODELS, Recipe
from patchbox.elf.tls import TlsImage
from patchbox.errors import UnsupportedRelocation
from patchbox.extract.model import Target, TargetKind

__all__ = ["TlsVariable", "reach_tls"]

# How an executable's variables are reached when the patch was compiled as for a library.
_EXE_HINT = (
    "; an executable's code reaches its thread-local variables with initial-exec or "
    "local-exec: compile the fix as the program was compiled (-fPIE, not -fPIC)"
)


@dataclass(frozen=True)
class TlsVariable:
    """The running program's thread-local variable a patch's access names: its symbol
    name and its offset in the reference binary's TLS block (None: another module's)."""

    name: str
    offset: int | None


@dataclass(frozen=True)
class Reached:
    """Where one access goes, and how that reads in the patch's meta."""

    target: Target
    how: str


def reach_tls(
    var: TlsVariable, recipe: Recipe, image: TlsImage, *, shared: bool, binary: str, at: str
) -> Reached:
    """Returns where an access of model ``recipe`` to ``var`` goes in the binary of
    ``image`` (``shared``: a shared library, named ``binary`` in messages); ``at`` is the
    place of the relocation. Raises UnsupportedRelocation naming the variable, the model
    and why when no safe target exists."""
    model = TLS_MODELS[recipe]

    def refuse(why: str) -> UnsupportedRelocation:
        return UnsupportedRelocation(
            f"thread-local variable {var.name!r} ({model} access in {at}): {why}"
        )

    def not_ours() -> UnsupportedRelocation:
        return refuse(
            f"{binary} does not define it, and a {model} access reaches only a variable "
            f"of the binary itself"
        )

    if recipe is Recipe.TLS_LE:
        if shared:
            raise refuse(
                f"{binary} is a shared library, whose offsets from the thread pointer are "
                f"known only at run time (local-exec is for executables): compile the fix "
                f"as the library was (-fPIC)"
            )
        if var.offset is None:
            raise not_ours()
        tp = image.tp_offset(var.offset)
        return Reached(Target(TargetKind.ABS, tp), f"{model}: TP offset {tp}")
    if recipe is Recipe.TLS_DTPOFF:
        if var.offset is None:
            raise not_ours()
        return Reached(
            Target(TargetKind.ABS, var.offset), f"{model}: offset {var.offset} in the block"
        )
    if recipe is Recipe.TLS_IE and not shared and var.offset is not None:
        tp = image.tp_offset(var.offset)
        return Reached(Target(TargetKind.ABS, tp), f"{model}: TP offset {tp} in a slot")
    if recipe is Recipe.TLS_IE:
        slot, entry = image.tpoff.find(var.name, var.offset), f"GOT slot ({image.facts.tpoff})"
        why = "its offset from the thread pointer is known only at run time"
    elif recipe is Recipe.TLS_GD:
        slot, entry = image.pairs.find(var.name, var.offset), f"GOT pair ({image.facts.dtpmod})"
        why = "its module id is known only at run time"
    elif recipe is Recipe.TLS_LD:
        if var.offset is None:
            raise not_ours()
        slot, entry = image.ld_pair, "GOT pair {module id, 0}"
        why = "its module id is known only at run time"
    elif recipe is Recipe.TLS_DESC:
        slot = image.descriptors.find(var.name, var.offset)
        entry = f"descriptor ({image.facts.desc})"
        why = "only the loader can fill a descriptor"
    else:
        raise refuse("not a thread-local access")  # pragma: no cover - the table's recipes
    if slot is None:
        raise refuse(
            f"{binary} has no {entry} for it (its own code never reaches it this way), and "
            f"{why}" + ("" if shared else _EXE_HINT)
        )
    return Reached(Target(TargetKind.EXE, slot), f"{model}: {entry} at {slot:#x}")
