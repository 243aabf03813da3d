"""The ``--explain`` text of `patchbox build`: per object, one line per symbol and verdict.

A function that is in the patch and inlines a function the diff changed gets the note
``(it inlines sq, changed by the diff)``: the diff says which new-side lines changed, the
patched object's DWARF (built with ``-g``) says which function each line belongs to and
what each out-of-line function inlines. Best effort: without ``-g`` there is no note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from patchbox.compare.model import ObjectDiff, Verdict
from patchbox.elf.dwarf import read_object_decls
from patchbox.errors import ElfError
from patchbox.sourcediff import changed_lines

__all__ = ["annotate_inlined", "format_explain"]

_ORDER = {Verdict.IN: 0, Verdict.REFUSED: 1, Verdict.CARRIED: 2, Verdict.OUT: 3}


def annotate_inlined(diffs: Sequence[ObjectDiff], diff_text: str) -> list[ObjectDiff]:
    """Returns ``diffs`` with the inlining note added to the reasons of their ``in``
    decisions."""
    lines = changed_lines(diff_text)
    out = []
    for d in diffs:
        if not any(x.verdict is Verdict.IN for x in d.decisions):
            out.append(d)
            continue
        try:
            decls = read_object_decls(d.patched)
        except ElfError:
            out.append(d)
            continue
        changed = {
            owner for fname, nums in lines.items() for n in nums if (owner := decls.owner(fname, n))
        }
        decisions = []
        for x in d.decisions:
            hit = sorted(decls.inlines.get(x.symbol, set()) & changed - {x.symbol})
            if x.verdict is Verdict.IN and hit:
                reason = f"{x.reason} (it inlines {', '.join(hit)}, changed by the diff)"
                decisions.append(replace(x, reason=reason))
            else:
                decisions.append(x)
        out.append(replace(d, decisions=tuple(decisions)))
    return out


def format_explain(diffs: Sequence[ObjectDiff], identical: int = 0) -> str:
    """Returns the ``--explain`` text: per object, one line per symbol with a verdict."""
    lines = []
    for d in diffs:
        src = f" ({d.source})" if d.source else ""
        lines.append(f"{d.rel}{src}:")
        if not d.decisions:
            lines.append("  (no function or variable differs)")
        for dec in sorted(d.decisions, key=lambda x: (_ORDER.get(x.verdict, 9), x.symbol)):
            lines.append(f"  {dec.verdict:<8} {dec.what:<8} {dec.symbol:<28} {dec.reason}")
    if identical:
        lines.append(f"{identical} object file(s) without a difference in code or data")
    return "\n".join(lines)
