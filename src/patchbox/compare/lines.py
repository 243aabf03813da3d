"""The ``__LINE__`` rule: a function whose only difference is a line number handed to a
reporting call is not changed.

Assert, panic and error macros (``assert``, QEMU's ``error_setg``, a server's own
``ASSERT``) pass ``__LINE__`` (and usually ``__FILE__`` or ``__func__``) to a reporting
function. A fix that moves lines makes every such call below it differ in one immediate,
in the functions that use the macro and wherever they are inlined. Such a difference is
*not* a change when, for every instruction that differs:

1. only immediate operands differ (same opcode, registers, memory operands, size);
2. a call follows within a few instructions (no jump or return before it): the
   immediate is an argument being set up;
3. the immediate is a line number the diff moved: the diff's line map of the object's
   source file takes the old value to the new one (``old`` → ``new``, checked exactly);
   where the call's ``__FILE__`` is another file the diff changes (a header whose
   inline function or macro reports its own place), that file's line map;
4. the call is a reporting call: its arguments include the compile unit's own file name
   (a ``__FILE__`` string), or a ``__func__`` string, or the callee is a reporting
   function the profile names.

Rules 3 and 4 come from the code and the diff, so a program's own assert function
needs no configuration. Without a line map (objects compared without a diff), rule 3 is
skipped and rule 4 requires a named reporting function (the profile's list).
"""

from __future__ import annotations

import os
from typing import ClassVar

from capstone import Cs, CsInsn

from patchbox.arch import Arch, Disasm
from patchbox.compare.model import CanonicalForm, RelocTarget, TargetKind
from patchbox.profiles import Reporters
from patchbox.sourcediff import FileChange

__all__ = ["LineCheck"]

_WINDOW = 16  # instructions between a differing immediate and its call


class LineCheck:
    """Decides whether two canonical forms differ only in moved ``__LINE__`` arguments."""

    _md: ClassVar[dict[str, Cs]] = {}  # by architecture: made once

    def __init__(
        self,
        arch: Arch,
        reporters: Reporters,
        source: str | None = None,
        lines: FileChange | None = None,
        headers: dict[str, FileChange] | None = None,
    ) -> None:
        self.arch = arch
        self.reporters = reporters
        self.source = os.path.basename(source) if source else None
        self.lines = lines
        # The other files the diff changes, by basename: a header's inline function or
        # macro reports its own __FILE__ and __LINE__, moved by that file's change.
        self.headers = {k: v for k, v in (headers or {}).items() if k != self.source}

    def disasm(self) -> Cs:
        """Returns the disassembler of the architecture (one per architecture, kept)."""
        md = self._md.get(self.arch.name)
        if md is None:
            md = self._md[self.arch.name] = self.arch.disasm.disassembler(detail=True)
        return md

    def only_lines(self, a: CanonicalForm, b: CanonicalForm, function: str = "") -> str | None:
        """Returns a description of the reporting calls if ``a`` and ``b`` (canonical
        forms of one function before and after) differ only in moved line numbers
        passed to them, else None."""
        if a.bss is not None or b.bss is not None:
            return None
        da, db = a.code, b.code
        if len(da) != len(db) or a.relocs != b.relocs:
            return None
        md = self.disasm()
        ia, ib = list(md.disasm(da, 0)), list(md.disasm(db, 0))
        if len(ia) != len(ib) or (ia and ia[-1].address + ia[-1].size != len(da)):
            return None
        targets = {r.offset: r.target for r in b.relocs}
        seen = []
        for k, (x, y) in enumerate(zip(ia, ib)):
            if x.bytes == y.bytes:
                continue
            pairs = _immediate_pairs(self.arch.disasm, x, y)
            if not pairs:
                return None
            found = _next_call(self.arch, ia, k)
            if found is None:
                return None
            call, joined = found
            who = self._reporting(ia, k, call, joined=joined, targets=targets, function=function)
            if who is None:
                return None
            # Rule 3 with the line map of the file the call reports: a header's own.
            lines = self.headers[who[1]] if who[1] is not None else self.lines
            if lines is not None and not all(lines.new_line(old) == new for old, new in pairs):
                return None
            seen.append(who[0])
        return ", ".join(dict.fromkeys(seen)) if seen else None

    def _reporting(
        self,
        insns: list[CsInsn],
        k: int,
        call: int,
        *,
        joined: int | None,
        targets: dict[int, RelocTarget],
        function: str,
    ) -> tuple[str, str | None] | None:
        """Returns how the call at ``insns[call]`` shows itself a reporting call (rule 4)
        and, when a ``__FILE__`` of another file the diff changes shows it (a header's
        inline code), that file's basename; ``joined`` is where a jump from the differing
        instruction's block landed (GCC cross-jumping: several calls sharing one), its
        instructions count as arguments too."""
        callee = targets.get(insns[call].address + self.arch.branches.call_field)
        named = callee is not None and callee.kind in (TargetKind.EXTERNAL, TargetKind.SYMBOL)
        name = callee.name if callee is not None and named else None
        known = name is not None and name in self.reporters
        if self.lines is None:
            return (name, None) if known and name is not None else None
        # The arguments: from after the previous call (or the function's start) to the call,
        # or to the jump into the shared call and from its target to the call.
        first = k
        br = self.arch.branches
        calls = br.call_mnemonics + br.jump_mnemonics
        while first > 0 and insns[first - 1].mnemonic not in calls:
            first -= 1
        region = insns[first:call] if joined is None else insns[first : k + 1] + insns[joined:call]
        texts = [
            text
            for ins in region
            for off in range(ins.address, ins.address + ins.size)
            if (t := targets.get(off)) is not None and (text := t.string()) is not None
        ]
        bases = {os.path.basename(text) for text in texts}
        header = next((b for b in sorted(bases) if b in self.headers), None)
        call_name = name or "a call"
        if header is not None:
            said = name if known and name else f"{call_name} ({header}'s __FILE__, __LINE__)"
            return said, header
        if known and name is not None:
            return name, None
        if self.source and self.source in bases:
            return f"{call_name} (__FILE__, __LINE__)", None
        if function and any(t in (function, function.split(".", maxsplit=1)[0]) for t in texts):
            return f"{call_name} (__func__, __LINE__)", None
        return None


def _immediate_pairs(dis: Disasm, x: CsInsn, y: CsInsn) -> list[tuple[int, int]]:
    """Returns the (old, new) immediates of two instructions that differ only there."""
    if (x.address, x.size, x.mnemonic) != (y.address, y.size, y.mnemonic):
        return []
    if len(x.operands) != len(y.operands) or not x.operands:
        return []
    pairs = []
    for p, q in zip(x.operands, y.operands):
        if p.type != q.type:
            return []
        if p.type == dis.op_imm:
            if p.imm != q.imm:
                pairs.append((p.imm, q.imm))
        elif p.type == dis.op_reg:
            if p.reg != q.reg:
                return []
        elif p.type != dis.op_mem or dis.mem_key(p) != dis.mem_key(q):
            return []
    return pairs


def _next_call(arch: Arch, insns: list[CsInsn], k: int) -> tuple[int, int | None] | None:
    """Returns (index of the call that follows ``insns[k]``, index a jump led to or None):
    straight on, or through one unconditional jump inside the function (GCC's
    cross-jumping joins calls that differ only in their arguments); None if a
    conditional jump or a return comes first."""
    br, dis = arch.branches, arch.disasm
    at = {ins.address: i for i, ins in enumerate(insns)}
    i, joined, steps = k + 1, None, 0
    while i < len(insns) and steps < _WINDOW:
        ins = insns[i]
        m = ins.mnemonic
        jump = m in br.jump_mnemonics
        if m in br.call_mnemonics or (jump and dis.branch_target(ins) not in at):
            return i, joined  # a call, or a tail call out of the function
        to = dis.branch_target(ins)
        if jump and joined is None and to is not None:
            i = joined = at[to]  # one hop: the shared call site
            steps += 1
            continue
        if m.startswith(br.stop_prefixes):
            return None
        i += 1
        steps += 1
    return None
