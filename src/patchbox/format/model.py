"""In-memory model of a patch: what extract-patch builds and the patch file stores.

The byte layout lives in :mod:`patchbox.format.layout`; this module has no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchbox.arch import ABSENT_MACHINE, Machine
from patchbox.wire import FixupBase, FixupSection, FixupType, HookKind, RedirectKind

__all__ = ["Function", "Fixup", "Hook", "Patch"]


@dataclass
class Function:
    """One replaced function."""

    symbol: str
    target: int  # link-time address of the original entry (the symbol)
    new_offset: int  # entry of the replacement inside Patch.text
    new_size: int
    # PATCHABLE_ENTRY: original bytes at [target-PAD, target-PAD+len) (PAD: the
    # architecture's entry padding, Arch.entry.pad); ENTRY_JUMP: original bytes at
    # [P, P+len), P = target+skip (docs/redirect.md)
    expected: bytes
    kind: RedirectKind = RedirectKind.PATCHABLE_ENTRY
    # The landing pad's length when one at the entry stays in place (Arch.entry.landing;
    # which redirect kinds keep one: format.layout's skip check)
    skip: int = 0

    @property
    def patch_point(self) -> int:
        """Returns the link-time address the redirect is written at (P for an entry jump)."""
        return self.target + self.skip


@dataclass
class Fixup:
    """One address still to resolve in the running process."""

    section: FixupSection
    type: FixupType
    base: FixupBase
    offset: int
    addend: int
    symbol: str = ""  # only for FixupBase.IMPORT


@dataclass
class Hook:
    """A function of the patch the agent runs around the switch (docs/shadow.md)."""

    when: HookKind
    offset: int  # entry of the hook function in Patch.text


@dataclass
class Patch:
    """A whole live patch."""

    name: str
    build_id: bytes
    text: bytes
    functions: list[Function]
    fixups: list[Fixup] = field(default_factory=list)
    data: bytes = b""
    bss_size: int = 0
    flags: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)
    # The architecture of the binary it patches (its ELF e_machine); the agent refuses a
    # patch for another one. A file written before the field existed is for ABSENT_MACHINE.
    machine: Machine = ABSENT_MACHINE
