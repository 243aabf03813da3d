"""Why a function differs: the changed functions inlined into it (for ``--explain``).

The diff says which lines changed (new-side line numbers per file); the patched object's
DWARF (built with ``-g``) says which function each line belongs to (``DW_AT_decl_line``
of ``DW_TAG_subprogram``: the last one declared at or before the line, in the same file)
and which functions each out-of-line function inlines (``DW_TAG_inlined_subroutine``).
A function that is in the patch and inlines a function the diff changed gets the note
``(it inlines sq, changed by the diff)``. Best effort: without ``-g`` there is no note.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile

__all__ = ["changed_lines", "annotate_inlined"]

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def changed_lines(diff_text: str) -> dict[str, set[int]]:
    """Returns {file basename: new-side line numbers added, or next to a deletion}."""
    out: dict[str, set[int]] = defaultdict(set)
    current, line = None, 0
    for text in diff_text.splitlines():
        if text.startswith("+++ "):
            current = os.path.basename(text[4:].split("\t")[0].strip())
            continue
        m = _HUNK.match(text)
        if m:
            line = int(m[1])
            continue
        if current is None or text.startswith("--- "):
            continue
        if text.startswith("+"):
            out[current].add(line)
            line += 1
        elif text.startswith("-"):
            out[current].add(line)
        elif text.startswith(" "):
            line += 1
    return dict(out)


def _name(die: DIE) -> str | None:
    seen = set()
    while die is not None and die.offset not in seen:
        seen.add(die.offset)
        if "DW_AT_name" in die.attributes:
            v = die.attributes["DW_AT_name"].value
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        nxt = None
        for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if ref in die.attributes:
                nxt = die.get_DIE_from_attribute(ref)
                break
        die = nxt
    return None


def _scan(path: Path) -> tuple[dict[str, list[tuple[int, str]]], dict[str, set[str]]]:
    """Returns ({file basename: [(decl line, function)]}, {function: names it inlines})."""
    decls: dict[str, list[tuple[int, str]]] = defaultdict(list)
    inlines: dict[str, set[str]] = defaultdict(set)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            return {}, {}
        dwarf = elf.get_dwarf_info()
        for cu in dwarf.iter_CUs():
            lp = dwarf.line_program_for_CU(cu)
            files = [e.name.decode(errors="replace") if isinstance(e.name, bytes) else str(e.name)
                     for e in (lp["file_entry"] if lp else [])]
            base = 0 if cu["version"] >= 5 else 1
            for die in cu.iter_DIEs():
                if die.tag != "DW_TAG_subprogram":
                    continue
                a = die.attributes
                if "DW_AT_name" in a and "DW_AT_decl_line" in a and "DW_AT_decl_file" in a:
                    idx = a["DW_AT_decl_file"].value - base
                    if 0 <= idx < len(files):
                        decls[os.path.basename(files[idx])].append(
                            (a["DW_AT_decl_line"].value, _name(die) or ""))
                if "DW_AT_low_pc" in a or "DW_AT_ranges" in a:
                    me = _name(die)
                    if me is None:
                        continue
                    stack = list(die.iter_children())
                    while stack:
                        d = stack.pop()
                        if d.tag == "DW_TAG_inlined_subroutine" and \
                                "DW_AT_abstract_origin" in d.attributes:
                            n = _name(d.get_DIE_from_attribute("DW_AT_abstract_origin"))
                            if n:
                                inlines[me].add(n)
                        if d.tag in ("DW_TAG_inlined_subroutine", "DW_TAG_lexical_block"):
                            stack.extend(d.iter_children())
    for v in decls.values():
        v.sort()
    return decls, inlines


def annotate_inlined(diffs: list, diff_text: str) -> None:  # type: ignore[type-arg]
    """Adds the inlining note to the ``in`` decisions of ``diffs`` (ObjectDiff list)."""
    lines = changed_lines(diff_text)
    for d in diffs:
        if not any(x.verdict == "in" for x in d.decisions):
            continue
        try:
            decls, inlines = _scan(d.patched)
        except (_PyElfError, OSError, ValueError, KeyError, IndexError, AssertionError):
            continue
        changed: set[str] = set()
        for fname, nums in lines.items():
            table = decls.get(fname, [])
            for n in nums:
                owner = None
                for decl, name in table:
                    if decl > n:
                        break
                    owner = name
                if owner:
                    changed.add(owner)
        for x in d.decisions:
            if x.verdict != "in":
                continue
            hit = sorted(inlines.get(x.symbol, set()) & changed - {x.symbol})
            if hit:
                x.reason += f" (it inlines {', '.join(hit)}, changed by the diff)"


def global_homes(obj_path: Path, names: list[str]) -> dict[str, str]:
    """Returns {global function: basename of its .c file} for the functions of ``names``
    whose only declaration in ``obj_path``'s DWARF is in the object's own ``.c`` file
    (not a header): no other compile unit has their body, so only that file's CU can
    inline them (:func:`patchbox.elf.dwarf.find_inlined`'s ``homes``). Empty without -g."""
    try:
        decls, _inl = _scan(Path(obj_path))
    except Exception:  # unreadable DWARF: no shortcut, the full scan decides
        return {}
    where: dict[str, set[str]] = defaultdict(set)
    for fname, entries in decls.items():
        for _line, fn in entries:
            where[fn].add(fname)
    return {fn: next(iter(where[fn])) for fn in names
            if len(where.get(fn, ())) == 1 and next(iter(where[fn])).endswith(".c")}
