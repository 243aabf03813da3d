"""What differs per architecture, as data: one module per architecture
(:mod:`patchbox.arch.x86_64`, :mod:`patchbox.arch.aarch64`), each one :class:`Arch`;
and the lookups every other room asks: by name, by ELF ``e_machine``, of this host.

Nothing outside this room names an architecture (tests/test_arch_confined.py): a room
that works on a binary asks for that binary's :class:`Arch` (``ObjectFile.arch``,
``Binary.arch``) and reads the fact from it. This room imports nothing of the project
but :mod:`patchbox.errors` and :mod:`patchbox.wire` (the patch's fix-up types a
relocation's field is written with).
"""

from __future__ import annotations

import platform
from enum import IntEnum

from patchbox import wire as C
from patchbox.arch import aarch64, x86_64
from patchbox.arch.model import (
    TLS_MODELS,
    Arch,
    Branches,
    Calc,
    Disasm,
    EntryLayout,
    Frame,
    Recipe,
    RegisterFile,
    Registers,
    RelocTable,
    RelocType,
    SigFrame,
    TlsFacts,
)
from patchbox.errors import ElfError

__all__ = [
    "Arch",
    "Branches",
    "Calc",
    "Disasm",
    "EntryLayout",
    "Frame",
    "Recipe",
    "RegisterFile",
    "Registers",
    "RelocTable",
    "RelocType",
    "SigFrame",
    "TLS_MODELS",
    "TlsFacts",
    "ABSENT_MACHINE",
    "Machine",
    "iter_arches",
    "get_arch",
    "get_arch_by_machine",
    "host_arch",
    "unnamed_arch",
]

_ARCHES: tuple[Arch, ...] = (x86_64.ARCH, aarch64.ARCH)
# Other spellings of the names (`dpkg --print-architecture`, LLVM, Go).
_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


class Machine(IntEnum):
    """The architecture a patch is for, as its apply body's ``machine`` field carries it:
    the ELF ``e_machine`` of each architecture of this room (docs/patch-format.md)."""

    X86_64 = x86_64.ARCH.e_machine
    AARCH64 = aarch64.ARCH.e_machine


# The machine of an apply body without the field (every body written before it existed).
ABSENT_MACHINE = Machine(C.ABSENT_MACHINE)


def iter_arches() -> tuple[Arch, ...]:
    """Returns every architecture patchbox knows."""
    return _ARCHES


def get_arch(name: str) -> Arch:
    """Returns the architecture called ``name`` (``uname -m``'s name or a common alias);
    raises ElfError for one patchbox does not know."""
    name = _ALIASES.get(name, name)
    for arch in _ARCHES:
        if arch.name == name:
            return arch
    known = ", ".join(a.name for a in _ARCHES)
    raise ElfError(f"unknown architecture {name!r} (patchbox knows {known})")


def get_arch_by_machine(machine: int | str, what: str = "") -> Arch:
    """Returns the architecture of ELF ``e_machine`` ``machine`` (the number, or
    pyelftools' name ``EM_*``); raises ElfError naming ``what`` (a path) otherwise."""
    for arch in _ARCHES:
        if machine in (arch.e_machine, arch.machine_name):
            return arch
    known = ", ".join(a.title for a in _ARCHES)
    prefix = f"{what}: " if what else ""
    raise ElfError(f"{prefix}an ELF file for machine {machine}: patchbox knows {known}")


def unnamed_arch() -> Arch:
    """Returns the architecture of a patch file that names none: every patch made before
    the format recorded one is for x86-64."""
    return get_arch_by_machine(ABSENT_MACHINE)


def host_arch() -> Arch:
    """Returns the architecture this Python runs on (what ptrace of a native process
    sees); raises ElfError on one patchbox does not know."""
    return get_arch(platform.machine())
