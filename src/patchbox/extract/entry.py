"""The entry-jump fallback for functions without the patchable entry (docs/redirect.md,
"Functions without the padding").

A function of the reference binary that lacks the 6+2 NOPs of ``patchbox config
--cflags`` can still be redirected by overwriting the first 5 bytes at the patch point
P (the entry, or entry+4 past an ``endbr64``) with ``e9 rel32`` in one aligned 8-byte
atomic store. :func:`analyse_entry` decides with capstone whether that is safe and
refuses naming the rule that fails:

1. at least 5 bytes of the function from P;
2. the instruction at P is at least 5 bytes long and [P, P+5) lies in one aligned
   8-byte word (P % 8 <= 3), so one atomic store writes the jump and no thread can be
   stopped inside it (threads only stop between instructions); otherwise the jump is
   *held* (``EntryJump.held``, the HOLD apply flag): written while the client holds
   every other thread clear of (P, P+5) (docs/reach.md);
3. no direct branch of the function (or of its ``.cold``/``.part`` pieces) targets
   (P, P+5), and no call in [P, P+5) returns inside it; never overridable;
4. P % 8 != 7, so the jump's first two bytes lie in one word (remove parks threads
   there with ``jmp .``); never overridable.

Shared libraries are targets like the executable (the agent maps a sandbox near each
library it patches). Rule 6 (no stacking on an entry jump unless the replacement has
its own padding) is about the running process and enforced by the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_MODE_64, Cs
from capstone.x86 import X86_OP_IMM

from patchbox import wire as C
from patchbox.errors import ExtractError

__all__ = ["ENDBR64", "EntryJump", "analyse_entry"]

ENDBR64 = bytes.fromhex("f30f1efa")
WORD = 8


@dataclass(frozen=True)
class EntryJump:
    """The accepted entry jump of one function."""

    symbol: str
    entry: int  # link-time address of the function
    skip: int  # 0, or 4 past an endbr64
    first_len: int  # length of the instruction at P
    held: bool  # rule 2 does not hold: written while the threads are held (HOLD)

    @property
    def point(self) -> int:
        """Returns P, the address the 5-byte jump is written at."""
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
    pieces: list[tuple[str, int, bytes]] | None = None,
) -> EntryJump:
    """Returns the entry jump for function ``symbol`` at link-time ``entry`` whose
    bytes (by symbol size) are ``code``; raises ExtractError naming the rule it breaks.

    ``pieces`` are other code ranges (name, address, bytes) whose direct branches must
    not land inside the overwritten bytes either (GCC's ``symbol.cold``, ``.part.N``).
    A first instruction shorter than the jump, or a jump across two words, gives a
    held jump (rule 2).
    """
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    skip = C.ENDBR_SKIP if code.startswith(ENDBR64) else 0
    point = entry + skip
    avail = len(code) - skip
    if avail < C.JUMP_LEN:
        raise _refuse(
            symbol,
            "rule 1, too short",
            f"{max(avail, 0)} bytes from the patch point {point:#x} to its end "
            f"(symbol size {len(code)}), the jump needs {C.JUMP_LEN}",
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
    inside = range(point + 1, point + C.JUMP_LEN)
    for name, addr, body in [(symbol, entry, code), *(pieces or [])]:
        end = addr
        for insn in md.disasm(body, addr):
            end = insn.address + insn.size
            if not (insn.group(CS_GRP_JUMP) or insn.group(CS_GRP_CALL)):
                continue
            if insn.group(CS_GRP_CALL) and insn.address + insn.size in inside:
                raise _refuse(
                    symbol,
                    "rule 3, return address",
                    f"the {insn.mnemonic} at {insn.address:#x} returns to "
                    f"{insn.address + insn.size:#x}, inside the {C.JUMP_LEN} bytes the jump "
                    f"overwrites at {point:#x}: a thread inside the callee would return "
                    f"into the middle of the jump",
                )
            op = insn.operands[0] if insn.operands else None
            if op is not None and op.type == X86_OP_IMM and op.imm in inside:
                raise _refuse(
                    symbol,
                    "rule 3, branch target",
                    f"the {insn.mnemonic} at {name}+{insn.address - addr:#x} "
                    f"({insn.address:#x}) goes to {op.imm:#x}, inside the "
                    f"{C.JUMP_LEN} bytes the jump overwrites at {point:#x}",
                )
        if end != addr + len(body):
            raise _refuse(
                symbol,
                "rule 3, branch target",
                f"capstone cannot decode {name}+{end - addr:#x} "
                f"({body[end - addr : end - addr + 8].hex(' ')}), so branches into "
                f"the overwritten bytes cannot be ruled out",
            )
    held = first.size < C.JUMP_LEN or point % WORD > WORD - C.JUMP_LEN
    return EntryJump(symbol, entry, skip, first.size, held)
