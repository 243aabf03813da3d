"""Function-level comparison of an original and a patched object file (`patchbox build`).

Both objects are compiled with ``patchbox config --cflags`` (one section per function and
per variable). Every defined function and variable of the patched object is paired with
its original, then compared in a *canonical form*: its bytes with every relocation field
zeroed, plus the list of its relocations, each described by what it names rather than by
symbol index or label:

- a symbol of another object or library: its name (``ext``);
- a function or variable of this object: its name, GCC's numeric suffixes normalised
  (``counter.0`` ~ ``counter.3``, ``foo.constprop.0`` ~ ``foo.constprop.1``), through the
  pairing of the two objects;
- a string literal (``.LC0`` in a mergeable ``.rodata.str*`` section): the string's bytes;
  ``__FILE__``-like paths compare by basename; a mergeable constant: its bytes;
- a read-only ``static`` object (jump tables, ``CSWTCH``, ``__func__``, ``static const``
  tables) or anonymous read-only data: its own canonical form, so a changed table makes
  the functions using it differ (extract copies read-only data into the patch).

Decisions per function: unchanged → out; differs → in (the reason names the first
difference); differs only in immediates set up as arguments of a call to a reporting
function of the profile (``__LINE__``) → out; new → carried (copied if the new code
reaches it); a GCC clone (``.cold``, ``.part.N``, ``.constprop.N``, ``.isra.N``) that
differs is carried and every function calling it is in. Variables: new → carried; an
existing writable or global variable whose size or initial value differs → refused; a
writable static variable the replaced code used that the patched object lacks (folded
into its initial value by the compiler), or that became read-only there, or that is
read-only in the original and written in the patched object → refused.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from elftools.elf.constants import SH_FLAGS

from patchbox.compare.lines import LineCheck
from patchbox.compare.model import (
    CanonicalForm,
    Cycle,
    Decision,
    FormReloc,
    ItemKind,
    ObjectDiff,
    RelocTarget,
    TargetKind,
    Verdict,
)
from patchbox.compare.types import layout_changes, read_layouts
from patchbox.elf import dwarf
from patchbox.elf.binary import Binary, SourceMatch
from patchbox.elf.fastread import load_object
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.errors import ElfError
from patchbox.profiles import GENERIC, Reporters
from patchbox.sourcediff import FileChange

__all__ = [
    "Decision",
    "ObjectDiff",
    "compare_objects",
    "file_statics",
    "written_statics",
    "refuse_folded_statics",
    "compare_trees",
    "normalize",
    "is_clone",
    "other_programs",
]

_CLONE = re.compile(r"\.(cold|part|constprop|isra|lto_priv|clone|localalias|specialized)(\.|$)")
_PATHLIKE = re.compile(rb"^[\w.+-]*(/[\w.+-]+)+\.(c|h|cc|cpp|cxx|hh|hpp|inc|def)$")
_CST = re.compile(r"\.cst(\d+)")


def normalize(name: str) -> str:
    """Returns ``name`` without GCC's numeric suffixes (``foo.part.3`` → ``foo.part``)."""
    parts = name.split(".")
    return ".".join([parts[0]] + [p for p in parts[1:] if not p.isdigit()])


def is_clone(name: str) -> bool:
    """Returns True for GCC's out-of-line pieces and clones (``.cold``, ``.part.N``, ...)."""
    return bool(_CLONE.search(name))


def _named(sym: ObjSymbol) -> bool:
    return (
        sym.defined
        and bool(sym.name)
        and not sym.name.startswith(".L")
        and sym.type in ("FUNC", "OBJECT", "TLS", "NOTYPE")
    )


class _Side:
    """One object in canonical form (memoised per byte range)."""

    def __init__(self, obj: ObjectFile) -> None:
        self.obj = obj
        self.named: dict[int, list[ObjSymbol]] = defaultdict(list)
        for s in obj.symbols:
            if _named(s):
                self.named[s.shndx].append(s)
        for syms in self.named.values():
            syms.sort(key=lambda s: s.value)
        self.ident: dict[int, str] = {}
        self._memo: dict[tuple[int, int, int], CanonicalForm | Cycle] = {}
        self._rels: dict[int, list[Relocation]] = {}

    def relocs(self, sec: Section) -> list[Relocation]:
        if sec.index not in self._rels:
            self._rels[sec.index] = self.obj.get_relocations(sec)
        return self._rels[sec.index]

    def span(self, sym: ObjSymbol) -> tuple[Section, int, int]:
        sec = self.obj.get_section(sym.shndx)
        syms = self.named[sec.index]
        if len(syms) == 1 or all(s.value == sym.value for s in syms):
            return sec, 0, sec.size
        end = (
            sym.value + sym.size
            if sym.size
            else min([s.value for s in syms if s.value > sym.value] + [sec.size])
        )
        return sec, sym.value, min(end, sec.size)

    def form(self, sec: Section, start: int, end: int) -> CanonicalForm:
        """Returns the canonical form of ``sec[start:end]``."""
        form = self._form(sec, start, end)
        assert isinstance(form, CanonicalForm)  # a Cycle only while the range is being built
        return form

    def _form(self, sec: Section, start: int, end: int) -> CanonicalForm | Cycle:
        """Returns the canonical form of ``sec[start:end]``, or a Cycle when asked again
        while building it (a range that points into itself)."""
        key = (sec.index, start, end)
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = Cycle(sec.name, start)
        if sec.is_nobits:
            result = CanonicalForm(b"", (), bss=end - start)
        else:
            data = bytearray(sec.data[start:end])
            rels = []
            for rel in self.relocs(sec):
                if start <= rel.offset < end:
                    rtype = self.obj.arch.relocs.get(rel.type)
                    size = rtype.size if rtype else 4
                    o = rel.offset - start
                    data[o : o + size] = bytes(len(data[o : o + size]))
                    rels.append(FormReloc(o, rel.type, self.target(rel)))
            result = CanonicalForm(bytes(data), tuple(rels))
        self._memo[key] = result
        return result

    def target(self, rel: Relocation) -> RelocTarget:
        """Returns what ``rel`` points to, independently of labels and symbol numbers."""
        sym = rel.symbol
        if sym.is_abs:
            return RelocTarget(TargetKind.ABS, value=sym.value + rel.addend)
        if not sym.defined:
            return RelocTarget(TargetKind.EXTERNAL, name=sym.name, value=rel.addend)
        sec = self.obj.get_section(sym.shndx)
        base = sym.value if sym.type != "SECTION" else 0
        rtype = self.obj.arch.relocs.get(rel.type)
        # A pc-relative addend may count from elsewhere than the field (Arch.pcrel_bias).
        off = (
            base
            + rel.addend
            + (self.obj.arch.pcrel_bias if rtype is not None and rtype.pcrel else 0)
        )
        if sec.flags & SH_FLAGS.SHF_MERGE and not sec.is_nobits:
            if sec.flags & SH_FLAGS.SHF_STRINGS:
                end = sec.data.find(b"\0", off)
                text = sec.data[off : end if end >= 0 else len(sec.data)]
                return RelocTarget(TargetKind.STRING, data=_norm_string(text))
            m = _CST.search(sec.name)
            n = int(m[1]) if m else sec.align
            return RelocTarget(TargetKind.CONSTANT, data=sec.data[off : off + n])
        if _named(sym):
            return self.symref(sym, rel.addend)
        cands = self.named.get(sec.index, [])
        if not cands:
            form = self._form(sec, 0, sec.size)
            return RelocTarget(TargetKind.ANONYMOUS, value=base + rel.addend, form=form)
        pick = cands[0]
        for c in cands:
            if c.value <= off:
                pick = c
        return self.symref(pick, base + rel.addend - pick.value)

    def symref(self, sym: ObjSymbol, addend: int) -> RelocTarget:
        sec = self.obj.get_section(sym.shndx)
        if sym.is_local and sec.is_rodata:
            form = self._form(*self.span(sym))
            return RelocTarget(TargetKind.READ_ONLY, value=addend, form=form)
        name = self.ident.get(sym.index, sym.name)
        return RelocTarget(TargetKind.SYMBOL, name=name, value=addend)


def _norm_string(text: bytes) -> bytes:
    """``__FILE__`` strings that differ only in their directory compare equal."""
    return os.path.basename(text) if _PATHLIKE.match(text) else text


def _suffix_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".")[1:] if p.isdigit())


def _pair(orig: _Side, new: _Side) -> dict[int, ObjSymbol]:
    """Returns {patched symbol index: original symbol}: globals by name, locals by
    normalised name and kind, in suffix order when several share one."""

    def groups(side: _Side) -> dict[tuple[str, ...], list[ObjSymbol]]:
        out: dict[tuple[str, ...], list[ObjSymbol]] = defaultdict(list)
        for s in side.obj.symbols:
            if _named(s):
                kind = "F" if s.type == "FUNC" else "D"
                key = (kind, s.name) if not s.is_local else (kind, "local", normalize(s.name))
                out[key].append(s)
        for v in out.values():
            v.sort(key=lambda s: (_suffix_key(s.name), s.index))
        return out

    def content(side: _Side, sym: ObjSymbol) -> bytes:
        sec, start, end = side.span(sym)
        return sec.data[start:end] if not sec.is_nobits else b""

    go, gn = groups(orig), groups(new)
    pairs = {}
    for key, news in gn.items():
        olds = list(go.get(key, []))
        syms = news
        if key[0] == "D" and key[1] == "local" and (len(news) > 1 or len(olds) > 1):
            # Numbered locals (`__func__.N`, `CSWTCH.N`): an inserted function renumbers
            # the rest; equal contents pair first, whatever the numbers.
            by_bytes: dict[bytes, list[ObjSymbol]] = defaultdict(list)
            for o in olds:
                by_bytes[content(orig, o)].append(o)
            rest = []
            for s in news:
                same = by_bytes.get(content(new, s))
                if same:
                    o = same.pop(0)
                    pairs[s.index] = o
                    olds.remove(o)
                else:
                    rest.append(s)
            syms = rest
        for s, o in zip(syms, olds):
            pairs[s.index] = o
    return pairs


def _difference(a: CanonicalForm, b: CanonicalForm) -> str:
    """Returns the first difference of two forms of one function, as a reason."""
    if len(a.relocs) == len(b.relocs):
        for x, y in zip(a.relocs, b.relocs):
            if x.target != y.target:
                was, now = x.target.describe(), y.target.describe()
                if was == now:
                    return f"{now} changed (+{y.offset:#x})"
                return f"references {now} instead of {was} (+{y.offset:#x})"
    else:
        before = {r.target.describe() for r in a.relocs}
        after = {r.target.describe() for r in b.relocs}
        added, gone = sorted(after - before), sorted(before - after)
        if added:
            return "now references " + ", ".join(added[:3])
        if gone:
            return "no longer references " + ", ".join(gone[:3])
    if len(a.code) != len(b.code):
        return f"code size {len(a.code)} -> {len(b.code)} bytes"
    first = next((i for i, (x, y) in enumerate(zip(a.code, b.code)) if x != y), 0)
    return f"code differs at +{first:#x}"


def compare_objects(
    orig: ObjectFile | str | Path | None,
    patched: ObjectFile | str | Path,
    reporters: Reporters | None = None,
    rel: str | None = None,
    lines: dict[str, FileChange] | None = None,
) -> ObjectDiff:
    """Returns the comparison of ``patched`` with ``orig`` (None: a new object): a
    decision per symbol.

    ``lines`` is the diff's line map per file basename (:func:`patchbox.sourcediff.line_maps`):
    with it, ``__LINE__`` differences are recognised from the code (:mod:`patchbox.compare.lines`);
    a source file the diff does not change keeps its line numbers."""
    if not isinstance(patched, ObjectFile):
        patched = load_object(patched)
    if orig is not None and not isinstance(orig, ObjectFile):
        orig = load_object(orig)
    reporters = reporters or GENERIC.reporters
    out = ObjectDiff(
        rel=rel or patched.path.name,
        patched=patched.path,
        orig=orig.path if orig is not None else None,
        source=patched.source_file,
    )
    new = _Side(patched)
    syms = [s for s in patched.symbols if _named(s) and s.type != "NOTYPE"]
    if orig is None:
        return replace(
            out,
            decisions=tuple(
                Decision(s.name, _what(s), Verdict.CARRIED, "new object file") for s in syms
            ),
            new_globals=frozenset(s.name for s in syms if not s.is_local),
        )
    old = _Side(orig)
    pairs = _pair(old, new)
    for s in old.obj.symbols:
        if _named(s):
            old.ident[s.index] = s.name
    for s in syms:
        o = pairs.get(s.index)
        new.ident[s.index] = o.name if o is not None else f"new:{s.name}"
    source = os.path.basename(patched.source_file) if patched.source_file else None
    line_map = None
    if lines is not None:
        line_map = _line_map(lines, source, patched.path)
    # The diff's other files by basename, those whose basename is theirs alone.
    bases = Counter(os.path.basename(k) for k in lines or {})
    headers = {
        os.path.basename(k): v for k, v in (lines or {}).items() if bases[os.path.basename(k)] == 1
    }
    check = LineCheck(patched.arch, reporters, source, line_map, headers)
    cmp = _Comparison(old, new, check)
    for s in syms:
        cmp.symbol(s, pairs.get(s.index))
    cmp.carry_clone_callers(syms)
    functions = [s.name for s in syms if s.name in cmp.changed and s.type == "FUNC"]
    decisions = cmp.decisions
    decisions += [
        Decision(f, ItemKind.FUNCTION, Verdict.IN, f"changed: {cmp.changed[f]}") for f in functions
    ]
    decisions += cmp.removed_variables(syms, pairs)
    decisions += _compare_types(out.orig, out.patched)
    return replace(
        out,
        decisions=tuple(decisions),
        functions=tuple(functions),
        clones=frozenset(cmp.clones),
        new_globals=frozenset(cmp.new_globals),
    )


class _Comparison:
    """The comparison of two objects as :func:`compare_objects` makes it: the decisions so
    far, the changed functions the original has (name -> reason), the changed GCC clones
    and the new globals."""

    def __init__(self, old: _Side, new: _Side, linecheck: LineCheck) -> None:
        self.old, self.new, self.linecheck = old, new, linecheck
        self.decisions: list[Decision] = []
        self.changed: dict[str, str] = {}
        self.clones: set[str] = set()
        self.new_globals: set[str] = set()

    def symbol(self, s: ObjSymbol, o: ObjSymbol | None) -> None:
        """Compares patched symbol ``s`` with its original ``o`` (None: new)."""
        if o is None:
            if not s.is_local:
                self.new_globals.add(s.name)
            kind = _what(s)
            self.decisions.append(
                Decision(
                    s.name,
                    kind,
                    Verdict.CARRIED,
                    f"new {kind}: copied into the patch if the new code uses it",
                )
            )
        elif s.type == "FUNC":
            self._function(s, o)
        else:
            data = _compare_data(self.old, self.new, o, s)
            if data is not None:
                self.decisions.append(data)

    def _function(self, s: ObjSymbol, o: ObjSymbol) -> None:
        """Compares function ``s`` with its original ``o``: the same, only __LINE__-like
        immediates differ (out), a changed clone (carried) or changed."""
        a, b = self.old.form(*self.old.span(o)), self.new.form(*self.new.span(s))
        if a == b:
            return
        line = self.linecheck.only_lines(a, b, s.name)
        if line is not None:
            self.decisions.append(
                Decision(
                    s.name,
                    ItemKind.FUNCTION,
                    Verdict.OUT,
                    f"only __LINE__-like immediates passed to {line} differ: not a change",
                )
            )
        elif is_clone(s.name):
            self.clones.add(s.name)
            self.decisions.append(
                Decision(
                    s.name,
                    ItemKind.FUNCTION,
                    Verdict.CARRIED,
                    f"GCC clone changed ({_difference(a, b)}): "
                    f"copied with the functions that call it",
                )
            )
        else:
            self.changed[s.name] = _difference(a, b)

    def carry_clone_callers(self, syms: list[ObjSymbol]) -> None:
        """Callers of a changed clone are in (the clone is not an entry point of its
        own); a caller that is a clone itself is carried, and its callers are in."""
        callers = _callers(self.new, syms)
        todo = list(self.clones)
        while todo:
            c = todo.pop()
            for f in sorted(callers.get(c, ())):
                if f in self.changed or f in self.clones:
                    continue
                if is_clone(f):
                    self.clones.add(f)
                    todo.append(f)
                    self.decisions.append(
                        Decision(f, ItemKind.FUNCTION, Verdict.CARRIED, f"calls changed clone {c}")
                    )
                else:
                    self.changed[f] = f"calls changed clone {c}"

    def removed_variables(
        self, syms: list[ObjSymbol], pairs: dict[int, ObjSymbol]
    ) -> list[Decision]:
        """Returns a decision for each variable of the original the patched object no
        longer has: refused if it is a writable static the replaced code used, else out.

        What the replaced code used in the original: a writable variable of that list that
        the patched object no longer has may be gone only from the object, not from the
        source: GCC folds a static variable nothing writes into its initial value (found by
        the differential test: the only store removed, the new code read the initial value
        while the running program's variable held another)."""
        old = self.old
        paired = {o.index for o in pairs.values()}
        users = _variable_users(
            old,
            [
                pairs[s.index]
                for s in syms
                if s.index in pairs and (s.name in self.changed or s.name in self.clones)
            ],
        )
        out = []
        for s in old.obj.symbols:
            if not (_named(s) and s.type == "OBJECT" and s.index not in paired):
                continue
            if s.is_local and old.obj.get_section(s.shndx).is_write and s.name in users:
                by = ", ".join(sorted(users[s.name]))
                out.append(
                    Decision(
                        s.name,
                        ItemKind.VARIABLE,
                        Verdict.REFUSED,
                        f"writable static variable used by the replaced {by} is gone from the "
                        f"patched object: if nothing in the new code stores to it, the compiler "
                        f"folded it into its initial value, and the new code would read that "
                        f"instead of the running program's current value",
                    )
                )
            else:
                out.append(
                    Decision(
                        s.name,
                        ItemKind.VARIABLE,
                        Verdict.OUT,
                        "removed: the running program keeps it, the new code does not use it",
                    )
                )
        return out


def _compare_types(orig: Path | None, patched: Path) -> list[Decision]:
    """Returns a refusal for every struct or union whose layout the diff changes (from
    DWARF)."""
    if orig is None:
        return []
    try:
        changes = layout_changes(read_layouts(orig), read_layouts(patched))
    except ElfError as err:
        return [
            Decision(
                "(debug info)", ItemKind.TYPE, Verdict.OUT, f"struct layouts not compared: {err}"
            )
        ]
    out = []
    for change in changes:
        label, _, what = change.partition(": ")
        out.append(
            Decision(
                label,
                ItemKind.TYPE,
                Verdict.REFUSED,
                f"layout changed ({what}): objects the running program holds keep the old "
                f"layout, code replacement cannot change them (a new field: docs/shadow.md)",
            )
        )
    return out


def _what(sym: ObjSymbol) -> ItemKind:
    return ItemKind.FUNCTION if sym.type == "FUNC" else ItemKind.VARIABLE


def _compare_data(old: _Side, new: _Side, o: ObjSymbol, s: ObjSymbol) -> Decision | None:
    """Returns the decision on variable ``s`` paired with the original ``o``, None when
    nothing about it changed."""
    osec = old.obj.get_section(o.shndx)
    nsec = new.obj.get_section(s.shndx)
    if s.is_local and nsec.is_rodata and osec.is_write:
        # GCC makes a static variable nothing stores to read-only (found by the
        # differential test: the diff removed the only store to an array); the new code
        # would read the patch's copy of its initial value, not the running program's.
        return Decision(
            s.name,
            ItemKind.VARIABLE,
            Verdict.REFUSED,
            "writable static variable is read-only in the patched object: nothing in the "
            "new code stores to it, so the compiler made it a constant, and the new code "
            "would read its initial value instead of the running program's current value",
        )
    if s.is_local and osec.is_rodata and nsec.is_write:
        # The other way round: the running program has it in a read-only mapping (made
        # constant, nothing stored to it); bound to it, the new code's store would fault.
        return Decision(
            s.name,
            ItemKind.VARIABLE,
            Verdict.REFUSED,
            "static variable is read-only in the running program (nothing stored to it, "
            "so the compiler made it a constant) and the new code stores to it: that "
            "store would fault",
        )
    if s.is_local and nsec.is_rodata:
        if old.form(*old.span(o)) != new.form(*new.span(s)):
            return Decision(
                s.name,
                ItemKind.VARIABLE,
                Verdict.CARRIED,
                "read-only static data changed: the new value is "
                "copied with the functions that use it",
            )
        return None
    if o.size != s.size:
        return Decision(
            s.name,
            ItemKind.VARIABLE,
            Verdict.REFUSED,
            f"size of existing variable changed ({o.size} -> {s.size} bytes; a changed type "
            f"or struct layout): code replacement cannot change data the program already has",
        )
    if osec.is_tls != nsec.is_tls or old.form(*old.span(o)) != new.form(*new.span(s)):
        return Decision(
            s.name,
            ItemKind.VARIABLE,
            Verdict.REFUSED,
            "initial value of existing variable changed: the running program keeps its "
            "current value, code replacement cannot change it",
        )
    return None


def _variable_users(side: _Side, funcs: list[ObjSymbol]) -> dict[str, set[str]]:
    """Returns {variable name: functions of ``funcs`` whose code references it}."""
    users: dict[str, set[str]] = defaultdict(set)
    for f in funcs:
        sec, start, end = side.span(f)
        for rel in side.relocs(sec):
            t = rel.symbol
            if not start <= rel.offset < end or not t.defined or t.is_abs:
                continue
            if t.type == "OBJECT":
                users[t.name].add(f.name)
            elif t.type == "SECTION":
                for v in side.named.get(t.shndx, ()):
                    if v.type == "OBJECT":
                        users[v.name].add(f.name)
    return users


def _callers(side: _Side, syms: list[ObjSymbol]) -> dict[str, set[str]]:
    """Returns {function name: functions of the object whose code references it}."""
    by_section: dict[int, list[ObjSymbol]] = defaultdict(list)
    for s in syms:
        if s.type == "FUNC":
            by_section[s.shndx].append(s)
    users: dict[str, set[str]] = defaultdict(set)
    for s in syms:
        if s.type != "FUNC":
            continue
        sec, start, end = side.span(s)
        for rel in side.relocs(sec):
            if not start <= rel.offset < end or not rel.symbol.defined:
                continue
            t = rel.symbol
            if t.type == "FUNC":
                users[t.name].add(s.name)
            elif t.type == "SECTION":
                for f in by_section.get(t.shndx, ()):
                    users[f.name].add(s.name)
    return users


_STATIC_DEF = re.compile(r"^\s*static\b([^;(){}]*?)\b([A-Za-z_]\w*)\s*(?:\[[^;]*\])?\s*(?:=|;|,)")


def file_statics(text: str) -> set[str]:
    """Returns the names of the ``static`` variables defined at file scope in C source
    ``text`` (a plain reading: brace depth 0, comments and strings not understood, so it
    may miss one; it finds none that is not one)."""
    names, depth = set(), 0
    for line in text.splitlines():
        if depth == 0:
            m = _STATIC_DEF.match(line)
            if m and "(" not in line.split("=", 1)[0]:
                names.add(m[2])
        depth = max(0, depth + line.count("{") - line.count("}"))
    return names


# Where C source writes a variable: each alternative captures the identifier written —
# its address taken, assigned (through any subscripts; `==` is no assignment), or
# incremented. Lookaheads, so overlapping places (`a[i = 1] = 2`) are all found.
_IDENT = r"([A-Za-z_]\w*)"
_WRITES = re.compile(
    rf"(?=&\s*{_IDENT})"
    rf"|(?=\b{_IDENT}\s*(?:\[[^\]]*\]\s*)*(?:[-+*/%&|^]|<<|>>)?=(?!=))"
    rf"|(?=\b{_IDENT}\s*(?:\+\+|--))"
    rf"|(?=(?:\+\+|--)\s*{_IDENT})"
)


def written_statics(text: str, names: set[str]) -> set[str]:
    """Returns those of ``names`` (identifiers) that C source ``text`` may change at run
    time: assigned (``x = …``, ``x += …``, ``x++``), or with their address taken (``&x``:
    written through a pointer, as Csmith's ``int32_t *l_3 = &g_4; *l_3 = 1;``).

    One pass over the text for all names (a program's thousands of statics made one
    search per name cost seconds a file)."""
    body = [line for line in text.splitlines() if not _STATIC_DEF.match(line)]
    written = {g for line in body for m in _WRITES.finditer(line) for g in m.groups() if g}
    return names & written


# The left side of a store: `x = …`, `x[i] += …`, `*p = …`, `(*p) = …`, `p->f = …`, `x++`.
_STORE = re.compile(
    r"((?:\(\s*)?\*?\s*\(?\s*[A-Za-z_]\w*\s*\)?(?:\s*(?:->|\.)\s*\w+|\s*\[[^\]]*\])*)\s*"
    r"(?:(?:[-+*/%&|^]|<<|>>)?=(?!=)|\+\+|--)"
)
_NAME = re.compile(r"[A-Za-z_]\w*")


def _stores(lines: list[str]) -> set[str]:
    """Returns the left sides of the stores in ``lines``, spaces removed."""
    return {re.sub(r"\s+", "", m[1]) for line in lines for m in _STORE.finditer(line)}


def _address_taken(text: str, names: set[str]) -> set[str]:
    """Returns those of ``names`` whose address C source ``text`` takes (``&x``)."""
    return {n for n in names if re.search(rf"&\s*{re.escape(n)}\b", text)}


def refuse_folded_statics(
    diffs: Sequence[ObjectDiff],
    changes: list[FileChange],
    read_original: Callable[[FileChange], str | None],
) -> list[ObjectDiff]:
    """Returns ``diffs`` with a refusal added to each object whose source defines a
    ``static`` variable that the original object does not define — the compiler folded it
    away, so the running program keeps its value only in code — when that variable has
    state (the source writes it or takes its address; one never written is a constant,
    folding it is harmless) and the diff takes a store to it away (named, or through a
    pointer while its address is taken). Then the new code may read an initial value where
    the running program's code holds another (found by the differential test: Csmith seed
    1114, a store through a pointer removed; the original had folded the store and the read
    together).
    ``read_original`` returns a changed file's text before the diff (None: unknown)."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(diffs):
        if d.source and d.orig is not None:
            by_source[os.path.basename(d.source)].append(i)
    added: dict[int, list[Decision]] = defaultdict(list)
    for change in changes:
        if change.old is None:
            continue
        targets = _of_file(diffs, by_source.get(os.path.basename(change.old), []), change.old)
        text = read_original(change) if targets else None
        if not text:
            continue
        statics = written_statics(text, file_statics(text))
        # A store the diff takes away (its left side in no added line): the state it set
        # may be what the new code now reads. Named, or through a pointer to any static
        # whose address the source takes.
        gone = _stores(change.removed_text) - _stores(change.added_text)
        candidates = statics & {w for lhs in gone for w in _NAME.findall(lhs)}
        if any(lhs.lstrip("(").startswith("*") or "->" in lhs or "[" in lhs for lhs in gone):
            candidates |= _address_taken(text, statics)
        for i in targets:
            orig = diffs[i].orig
            assert orig is not None
            defined = {s.name.split(".")[0] for s in load_object(orig).symbols if _named(s)}
            added[i] += [
                Decision(
                    name,
                    ItemKind.VARIABLE,
                    Verdict.REFUSED,
                    f"static {name} of {os.path.basename(change.old)} is not in the original "
                    f"object: the compiler folded it away, so the running program keeps "
                    f"its value only in code, and the diff takes away a store to it: "
                    f"the new code could read its initial value where the running "
                    f"program's code holds another",
                )
                for name in sorted(candidates - defined)
            ]
    return [
        replace(d, decisions=d.decisions + tuple(added[i])) if added.get(i) else d
        for i, d in enumerate(diffs)
    ]


def compare_trees(
    orig: dict[str, Path],
    patched: dict[str, Path],
    reporters: Reporters | None = None,
    lines: dict[str, FileChange] | None = None,
    linked: set[str] | None = None,
) -> tuple[list[ObjectDiff], int]:
    """Compares every patched object with the original of the same relative path.

    Returns (the diffs of objects with a decision, number of objects without any:
    identical, or differing only in debug info).
    Objects of the original build that are gone are ignored. With ``linked`` (the source
    file basenames of the running binary), an object compiled from another file belongs
    to another program of the tree and is left out.
    """
    diffs, same = [], 0
    for rel, path in sorted(patched.items()):
        if linked is not None and _source_of(path) not in linked | {None}:
            continue
        o = orig.get(rel)
        if o is not None and o.read_bytes() == path.read_bytes():
            same += 1
            continue
        d = compare_objects(o, path, reporters, rel=rel, lines=lines)
        if d.decisions:
            diffs.append(d)
        else:  # differs only outside code and data (debug info, notes)
            same += 1
    return diffs, same


def _line_map(lines: dict[str, FileChange], source: str | None, obj: Path) -> FileChange:
    """Returns the change of the object's source file in ``lines``
    (:func:`patchbox.sourcediff.line_maps`): by basename, or, where the diff changes
    several files of that name, the one whose path ends like the object's compile unit
    (DWARF). A file the diff does not change, or one that cannot be told, keeps its line
    numbers (a moved ``__LINE__`` there is a change)."""
    if source is None:
        return FileChange(None, None)
    if source in lines:
        return lines[source]
    same = {name: c for name, c in lines.items() if os.path.basename(name) == source}
    try:
        path = dwarf.object_source_path(obj) if same else None
    except ElfError:
        path = None
    if path is None:
        return FileChange(None, None)
    tails = {name: dwarf.path_tail(name, path) for name in same}
    best = max(tails.values())
    winners = [name for name, n in tails.items() if n == best]
    return same[winners[0]] if best > 1 and len(winners) == 1 else FileChange(None, None)


def _of_file(diffs: Sequence[ObjectDiff], targets: list[int], name: str) -> list[int]:
    """Returns those of ``targets`` (indexes into ``diffs``, objects of one source file
    basename) compiled from diff file ``name``: where there are several, the ones whose
    compile unit's path (DWARF) ends most like it, if that says more than the basename,
    and those without debug info; else all of them."""
    if len(targets) <= 1:
        return targets
    tails: dict[int, int] = {}
    for i in targets:
        try:
            path = dwarf.object_source_path(diffs[i].patched)
        except ElfError:
            path = None
        if path is not None:
            tails[i] = dwarf.path_tail(name, path)
    best = max(tails.values(), default=0)
    return [i for i in targets if tails.get(i, best) == best] if best > 1 else targets


def _source_of(path: Path) -> str | None:
    """Returns the basename of an object's source file (its first STT_FILE), or None."""
    src = load_object(path).source_file
    return os.path.basename(src) if src else None


def other_programs(objects: dict[str, Path], binary: Binary) -> set[str]:
    """Returns the keys of ``objects`` that belong to another program of the tree although
    their source file is linked into ``binary``: a source compiled more than once (memcached
    builds ``memcached`` and ``memcached-debug`` from the same files, with other flags), where
    some function of the object has another size in ``binary`` than in the object.

    Objects of one basename are checked: the same file compiled twice, or two files of
    that name in different directories (QEMU's ``net/vhost-vdpa.c`` and
    ``hw/virtio/vhost-vdpa.c``), each compared with its own statics
    (:meth:`Binary.match_source`)."""
    by_source: dict[str | None, list[str]] = defaultdict(list)
    for rel, path in objects.items():
        by_source[_source_of(path)].append(rel)
    out: set[str] = set()
    for source, rels in by_source.items():
        if source is None or len(rels) == 1:
            continue
        for rel in rels:
            if not _sizes_match(load_object(objects[rel]), binary):
                out.add(rel)
    return out


def _sizes_match(obj: ObjectFile, binary: Binary) -> bool:
    """Returns False if a function of ``obj`` has another size in ``binary``: its statics
    compared with those of the unit of the binary it is, or (undecided: no debug info
    tells two files of its name apart) with those of any one unit it may be."""
    match = binary.match_source(obj, original=obj)
    scopes = match.split() if match is not None and len(match.units) > 1 else (match,)
    return any(_sizes_match_in(obj, binary, scope) for scope in scopes)


def _sizes_match_in(obj: ObjectFile, binary: Binary, scope: SourceMatch | None) -> bool:
    for sym in obj.symbols:
        if sym.type != "FUNC" or not sym.defined or not sym.size:
            continue
        ref = binary.find_symbol(sym.name, scope, local=sym.is_local)
        if ref is not None and ref.size != sym.size:
            return False
    return True
