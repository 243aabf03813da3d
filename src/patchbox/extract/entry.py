"""The entry-jump fallback for functions without the patchable entry (docs/redirect.md,
"Functions without the padding").

A function of the reference binary that lacks the patchable entry of ``patchbox config
--cflags`` can still be redirected by overwriting the first J bytes at the patch point P
(the entry, or past the landing pad the architecture keeps, ``EntryLayout.landing``)
with a jump of J = ``Branches.jump_len`` bytes in one aligned 8-byte atomic store (the
architecture's, :mod:`patchbox.arch`). :func:`analyse_entry` decides with capstone
whether that is safe and refuses naming the rule that fails:

1. at least J bytes of the function from P;
2. the instruction at P is at least J bytes long and [P, P+J) lies in one aligned
   8-byte word (P % 8 <= 8 - J), so one atomic store writes the jump and no thread can
   be stopped inside it (threads only stop between instructions); otherwise the jump is
   *held* (``EntryJump.held``, the HOLD apply flag): written while the client holds
   every other thread clear of (P, P+J) (docs/reach.md);
3. no direct branch of the function (or of its ``.cold``/``.part`` pieces) targets
   (P, P+J), and no call in [P, P+J) returns inside it; never overridable;
4. P % 8 != 7, so the jump's first two bytes lie in one word (remove parks threads
   there with a jump to itself); never overridable;
5. the architecture allows the first instruction to be replaced while other cores may
   execute it (``Branches.jump_over_unsafe``: where stores over live code are allowed
   only between some instructions, the first must be one of them); never
   overridable.

Shared libraries are targets like the executable (the agent maps a sandbox near each
library it patches). Rule 6 (no stacking on an entry jump unless the replacement has
its own padding) is about the running process and enforced by the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

from capstone import CS_GRP_CALL

from patchbox.arch import Arch
from patchbox.errors import ExtractError

__all__ = ["EntryJump", "analyse_entry"]

WORD = 8


@dataclass(frozen=True)
class EntryJump:
    """The accepted entry jump of one function."""

    symbol: str
    entry: int  # link-time address of the function
    skip: int  # 0, or the length of the landing pad kept at the entry
    first_len: int  # length of the instruction at P
    held: bool  # rule 2 does not hold: written while the threads are held (HOLD)

    @property
    def point(self) -> int:
        """Returns P, the address the jump is written at."""
        return self.entry + self.skip


def _refuse(symbol: str, rule: str, why: str) -> ExtractError:
    return ExtractError(
        f"{symbol} has no patchable entry and cannot use an entry jump ({rule}): {why}"
    )


def analyse_entry(
    symbol: str,
    entry: int,
    code: bytes,
    *,
    arch: Arch,
    pieces: list[tuple[str, int, bytes]] | None = None,
) -> EntryJump:
    """Returns the entry jump for function ``symbol`` at link-time ``entry`` whose
    bytes (by symbol size) are ``code`` (of a binary of ``arch``); raises ExtractError
    naming the rule it breaks.

    ``pieces`` are other code ranges (name, address, bytes) whose direct branches must
    not land inside the overwritten bytes either (GCC's ``symbol.cold``, ``.part.N``).
    A first instruction shorter than the jump, or a jump across two words, gives a
    held jump (rule 2).
    """
    md = arch.disasm.disassembler(detail=True)
    landing, jump_len = arch.entry.landing, arch.branches.jump_len
    skip = len(landing) if landing and code.startswith(landing) else 0
    point = entry + skip
    avail = len(code) - skip
    if avail < jump_len:
        raise _refuse(
            symbol,
            "rule 1, too short",
            f"{max(avail, 0)} bytes from the patch point {point:#x} to its end "
            f"(symbol size {len(code)}), the jump needs {jump_len}",
        )
    if point % WORD == WORD - 1:
        raise _refuse(
            symbol,
            "rule 4, alignment",
            f"the patch point {point:#x} is byte 7 of its 8-byte word, so the jump's first "
            f"two bytes straddle two words and remove could not park threads there",
        )
    first = next(md.disasm(code[skip : skip + 16], point, 1), None)
    if first is None:
        raise _refuse(
            symbol,
            "rule 2, first instruction",
            f"capstone cannot decode the instruction at {point:#x} "
            f"({code[skip : skip + 8].hex(' ')})",
        )
    unsafe = arch.branches.jump_over_unsafe
    why = unsafe(code[skip : skip + jump_len]) if unsafe else None
    if why:
        raise _refuse(symbol, "rule 5, the instruction replaced", why)
    inside = range(point + 1, point + jump_len)
    for name, addr, body in [(symbol, entry, code), *(pieces or [])]:
        end = addr
        for insn in md.disasm(body, addr):
            end = insn.address + insn.size
            if insn.group(CS_GRP_CALL) and insn.address + insn.size in inside:
                raise _refuse(
                    symbol,
                    "rule 3, return address",
                    f"the {insn.mnemonic} at {insn.address:#x} returns to "
                    f"{insn.address + insn.size:#x}, inside the {jump_len} bytes the jump "
                    f"overwrites at {point:#x}: a thread inside the callee would return "
                    f"into the middle of the jump",
                )
            to = arch.disasm.branch_target(insn)
            if to is not None and to in inside:
                raise _refuse(
                    symbol,
                    "rule 3, branch target",
                    f"the {insn.mnemonic} at {name}+{insn.address - addr:#x} "
                    f"({insn.address:#x}) goes to {to:#x}, inside the "
                    f"{jump_len} bytes the jump overwrites at {point:#x}",
                )
        if end != addr + len(body):
            raise _refuse(
                symbol,
                "rule 3, branch target",
                f"capstone cannot decode {name}+{end - addr:#x} "
                f"({body[end - addr : end - addr + 8].hex(' ')}), so branches into "
                f"the overwritten bytes cannot be ruled out",
            )
    held = first.size < jump_len or point % WORD > WORD - jump_len
    return EntryJump(symbol, entry, skip, first.size, held)
