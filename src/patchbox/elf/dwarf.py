"""What DWARF (``.debug_info``) says about functions: where the reference binary inlined
them, and where an object file declares them.

A live patch redirects the out-of-line copy of a function; copies the compiler inlined
into other functions keep the old code. :func:`find_inlined` lists them:
``DW_TAG_inlined_subroutine`` entries whose ``DW_AT_abstract_origin`` (followed through
``DW_AT_abstract_origin`` / ``DW_AT_specification`` chains) is the function, each with
the ``DW_TAG_subprogram`` that contains it.

Cost: the compile units are walked once, lazily, and only where an inlined copy can be:
CUs that cannot hold one (another source file, for ``static`` functions only) are
skipped after their top DIE, and inside a CU only the code-bearing subprograms and their
lexical blocks and inlined subroutines are entered (``DW_AT_sibling`` skips the rest).
Separate debug files (``.gnu_debuglink``, split DWARF) are not read.

:func:`read_object_decls` reads a patched object's own DWARF: the line each function is
declared at (to tell which function a changed line belongs to) and what each out-of-line
function inlines (``--explain``).

:func:`object_source_path` and :func:`unit_source_paths` give the full path of a compile
unit (``DW_AT_comp_dir`` joined with ``DW_AT_name``): an object's own, and the one each
group of static symbols of the reference binary came from, found by address
(``.debug_aranges``, else the variables and functions of the CUs of that basename). The
binary's ``.symtab`` names source files by basename only; these tell two ``util.c`` of
different directories apart (:meth:`patchbox.elf.binary.Binary.match_source`).
"""

from __future__ import annotations

import io
import os
import struct
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.elf.elffile import ELFFile

from patchbox.elf.fastread import load_object
from patchbox.errors import ElfError

__all__ = [
    "Function",
    "InlineSite",
    "ObjectDecls",
    "find_inlined",
    "has_debug_info",
    "has_lto_units",
    "object_dwarf",
    "object_source_path",
    "path_tail",
    "read_object_decls",
    "unit_source_paths",
]

_CODE_SCOPES = ("DW_TAG_lexical_block", "DW_TAG_inlined_subroutine", "DW_TAG_subprogram")
_CONTAINERS = ("DW_TAG_namespace", "DW_TAG_module")  # may hold definitions (C++, Fortran)
_DWARF5 = 5  # the version from which the line table's file numbers count from 0
_LTO_CU = "<artificial>"  # GCC's LTO units: they may inline statics of any file


@dataclass(frozen=True)
class Function:
    """A function as DWARF names it: ``source`` is the basename of its CU's DW_AT_name,
    ``path`` the CU's full path (:func:`_cu_path`)."""

    name: str
    source: str | None
    external: bool
    path: str | None = None


@dataclass(frozen=True)
class InlineSite:
    """``count`` inlined copies of a function inside the out-of-line code of ``caller``."""

    caller: Function
    count: int


def has_debug_info(elf: ELFFile) -> bool:
    """Returns True if ``elf`` has a non-empty ``.debug_info`` section."""
    sec = elf.get_section_by_name(".debug_info")
    return sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"] > 0


def has_lto_units(elf: ELFFile) -> bool:
    """Returns True if ``elf``'s DWARF has GCC's LTO compile units (named ``<artificial>``,
    which may inline functions of any file): looked up in the string sections, without
    walking the DWARF."""
    for name in (".debug_str", ".debug_line_str"):
        sec = elf.get_section_by_name(name)
        if sec is not None and sec["sh_type"] != "SHT_NOBITS" and _LTO_CU.encode() in sec.data():
            return True
    return False


def find_inlined(
    elf: ELFFile,
    targets: dict[str, str | None],
    path: str = "",
    homes: dict[str, str] | None = None,
) -> tuple[dict[str, list[InlineSite]], set[str]]:
    """Returns (inlined copies per target, targets whose own DIE was found).

    ``targets`` maps a function name to its source file for a ``static`` function (the
    full path of its compile unit, as :func:`unit_source_paths` gives it, where known:
    two files of one basename are told apart; else the basename), or None for a global
    one. ``homes`` optionally maps a global
    target to the basename of the one ``.c`` file that defines its body (the caller
    checked that its only declaration is there, not in a header): without LTO no other
    CU has the body to inline, so only CUs of that name are walked for it. Call only if
    :func:`has_debug_info`; raises ElfError if the DWARF cannot be read.
    """
    scan = _Scan(targets, homes or {})
    try:
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        for cu in dwarf.iter_CUs():
            top = cu.get_top_DIE()
            cu_name = _basename(top)
            if not scan.wants(cu_name):
                continue
            scan.walk(top, cu_name)
        return scan.result(), scan.found
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError) as err:
        raise ElfError(f"{path}: unreadable debug info: {err}") from err


class _Scan:
    def __init__(self, targets: dict[str, str | None], homes: dict[str, str]) -> None:
        self.targets = targets
        self.any_global = any(src is None and n not in homes for n, src in targets.items())
        self.statics = {os.path.basename(src) for src in targets.values() if src is not None}
        self.statics |= {homes[n] for n, src in targets.items() if src is None and n in homes}
        self.sites: dict[str, Counter[Function]] = {n: Counter() for n in targets}
        self.found: set[str] = set()
        self._identity: dict[int, Function | None] = {}  # DIE offset -> named function

    def wants(self, cu_name: str | None) -> bool:
        return self.any_global or cu_name in self.statics or cu_name in (None, _LTO_CU)

    def walk(self, top: DIE, cu_name: str | None) -> None:
        stack: list[tuple[DIE, DIE | None]] = [(top, None)]  # (scope, enclosing subprogram)
        while stack:
            scope, enclosing = stack.pop()
            for die in scope.iter_children():
                tag = die.tag
                if tag == "DW_TAG_inlined_subroutine":
                    if enclosing is not None:
                        self._site(die, enclosing)
                    stack.append((die, enclosing))
                elif tag == "DW_TAG_subprogram":
                    if enclosing is None and die.attributes.get("DW_AT_name") is not None:
                        self._note_definition(die)
                    if "DW_AT_low_pc" in die.attributes or "DW_AT_ranges" in die.attributes:
                        stack.append((die, die))  # concrete code: may hold inlined copies
                elif tag in _CODE_SCOPES or (enclosing is None and tag in _CONTAINERS):
                    stack.append((die, enclosing))

    def _note_definition(self, die: DIE) -> None:
        fn = self._resolve(die)
        if fn is not None and self._is_target(fn):
            self.found.add(fn.name)

    def _site(self, die: DIE, enclosing: DIE) -> None:
        if "DW_AT_abstract_origin" not in die.attributes:
            return
        fn = self._resolve(die.get_DIE_from_attribute("DW_AT_abstract_origin"))
        if fn is None or not self._is_target(fn):
            return
        caller = self._resolve(enclosing)
        self.sites[fn.name][caller or Function("<unnamed>", None, False)] += 1

    def _is_target(self, fn: Function) -> bool:
        if fn.name not in self.targets:
            return False
        src = self.targets[fn.name]
        if src is None:
            return fn.external
        return not fn.external and (fn.path if "/" in src else fn.source) == src

    def _resolve(self, die: DIE) -> Function | None:
        """Returns the function ``die`` stands for, following origins and specifications."""
        key = die.offset
        if key in self._identity:
            return self._identity[key]
        last, seen = die, {die.offset}
        external = False
        cur: DIE | None = die
        name = None
        while cur is not None:
            attrs = cur.attributes
            external = external or bool(
                attrs.get("DW_AT_external") and attrs["DW_AT_external"].value
            )
            if name is None and "DW_AT_name" in attrs:
                name = _str(attrs["DW_AT_name"].value)
            nxt = None
            for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
                if ref in attrs:
                    nxt = cur.get_DIE_from_attribute(ref)
                    break
            if nxt is None or nxt.offset in seen:
                break
            seen.add(nxt.offset)
            last = cur = nxt
        fn = None
        if name is not None:
            top = last.cu.get_top_DIE()
            fn = Function(name, _basename(top), external, _cu_path(top))
        self._identity[key] = fn
        return fn

    def result(self) -> dict[str, list[InlineSite]]:
        return {
            name: [
                InlineSite(caller, n)
                for caller, n in sorted(
                    counts.items(), key=lambda kv: (kv[0].name, kv[0].source or "")
                )
            ]
            for name, counts in self.sites.items()
            if counts
        }


def _str(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _basename(top: DIE) -> str | None:
    attr = top.attributes.get("DW_AT_name")
    return os.path.basename(_str(attr.value)) if attr is not None else None


@dataclass
class ObjectDecls:
    """What an object file's DWARF says about its functions (empty without ``-g``)."""

    # {file basename: [(DW_AT_decl_line, function)]}, sorted by line
    decls: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    # {out-of-line function: names of the functions inlined into it}
    inlines: dict[str, set[str]] = field(default_factory=dict)

    def owner(self, file: str, line: int) -> str | None:
        """Returns the function declared last at or before ``line`` of ``file`` (basename)."""
        owner = None
        for decl, name in self.decls.get(file, []):
            if decl > line:
                break
            owner = name
        return owner

    def homes(self, names: list[str]) -> dict[str, str]:
        """Returns {function: basename of its .c file} for the functions of ``names``
        whose only declaration is in one ``.c`` file (not a header)."""
        where: dict[str, set[str]] = defaultdict(set)
        for fname, entries in self.decls.items():
            for _line, fn in entries:
                where[fn].add(fname)
        return {
            fn: next(iter(where[fn]))
            for fn in names
            if len(where.get(fn, ())) == 1 and next(iter(where[fn])).endswith(".c")
        }


def object_dwarf(path: str | os.PathLike[str]) -> DWARFInfo | None:
    """Returns the DWARF of a relocatable object, its ``.rela.debug_*`` applied; None
    without debug info.

    pyelftools relocates debug sections through its construct-based reader, which costs
    more than a second on a QEMU object; this applies the (few kinds of) relocations
    GCC emits there (S + A (- P): the types ``RelocType.debug`` marks in the object's
    architecture, :mod:`patchbox.arch`; others there, thread-local offsets, are left as
    they are) with the fast reader's tables, then lets pyelftools read the result
    unrelocated.
    """
    obj = load_object(Path(path))
    raw = bytearray(obj.path.read_bytes())
    debug = {s.index: s for s in obj.sections if s.name.startswith(".debug_")}
    if not any(s.name == ".debug_info" for s in debug.values()):
        return None
    for index, sec in debug.items():
        base = sec.offset
        for rel in obj.relocations.get(index, []):
            rtype = obj.arch.relocs.get(rel.type)
            if rtype is None or not rtype.debug:
                continue
            size = rtype.size
            if rel.offset + size > sec.size:
                continue
            value = rel.symbol.value + rel.addend
            if rtype.pcrel:  # rare in debug sections
                value -= rel.offset
            raw[base + rel.offset : base + rel.offset + size] = (
                value & ((1 << (8 * size)) - 1)
            ).to_bytes(size, "little")
    return ELFFile(io.BytesIO(bytes(raw))).get_dwarf_info(relocate_dwarf_sections=False)


def read_object_decls(path: str | os.PathLike[str]) -> ObjectDecls:
    """Returns the function declarations and inlining of a relocatable object's DWARF
    (``DW_AT_decl_file``/``DW_AT_decl_line`` of ``DW_TAG_subprogram``, and the
    ``DW_TAG_inlined_subroutine`` entries inside each out-of-line function).

    Empty without debug info; raises ElfError if the DWARF cannot be read.
    """
    out = ObjectDecls()
    decls: dict[str, list[tuple[int, str]]] = defaultdict(list)
    inlines: dict[str, set[str]] = defaultdict(set)
    try:
        dwarf = object_dwarf(path)
        if dwarf is not None:
            for cu in dwarf.iter_CUs():
                lp = dwarf.line_program_for_CU(cu)
                files = [_str(e.name) for e in (lp["file_entry"] if lp else [])]
                base = 0 if cu["version"] >= _DWARF5 else 1
                for die in cu.iter_DIEs():
                    if die.tag != "DW_TAG_subprogram":
                        continue
                    a = die.attributes
                    if "DW_AT_name" in a and "DW_AT_decl_line" in a and "DW_AT_decl_file" in a:
                        idx = a["DW_AT_decl_file"].value - base
                        if 0 <= idx < len(files):
                            decls[os.path.basename(files[idx])].append(
                                (a["DW_AT_decl_line"].value, _origin_name(die) or "")
                            )
                    if "DW_AT_low_pc" in a or "DW_AT_ranges" in a:
                        me = _origin_name(die)
                        if me is not None:
                            inlines[me] |= _inlined_names(die)
    except OSError as err:
        raise ElfError(f"cannot read {path}: {err.strerror}") from err
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError) as err:
        raise ElfError(f"{path}: unreadable debug info: {err}") from err
    out.decls = {k: sorted(v) for k, v in decls.items()}
    out.inlines = dict(inlines)
    return out


def _inlined_names(die: DIE) -> set[str]:
    """Returns the names of the functions inlined (at any depth) into ``die``'s code."""
    names: set[str] = set()
    stack = list(die.iter_children())
    while stack:
        d = stack.pop()
        if d.tag == "DW_TAG_inlined_subroutine" and "DW_AT_abstract_origin" in d.attributes:
            n = _origin_name(d.get_DIE_from_attribute("DW_AT_abstract_origin"))
            if n:
                names.add(n)
        if d.tag in ("DW_TAG_inlined_subroutine", "DW_TAG_lexical_block"):
            stack.extend(d.iter_children())
    return names


def _origin_name(die: DIE | None) -> str | None:
    """Returns ``die``'s name, following abstract origins and specifications."""
    seen: set[int] = set()
    while die is not None and die.offset not in seen:
        seen.add(die.offset)
        if "DW_AT_name" in die.attributes:
            return _str(die.attributes["DW_AT_name"].value)
        nxt = None
        for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if ref in die.attributes:
                nxt = die.get_DIE_from_attribute(ref)
                break
        die = nxt
    return None


# -- compile units' full paths ---------------------------------------------------------

_DW_OP_ADDR = 0x03
_ADDRESS_SIZE = 8  # bytes of an address on a 64-bit target (DW_OP_addr's operand, aranges' tuples)
_DWARF64_ESCAPE = 0xFFFFFFFF  # a unit length of this value: the 64-bit DWARF format
_OBJECT_PATHS_KEPT = 4096  # objects' compile-unit paths remembered at most
_OBJECT_PATHS: dict[tuple[str, int, int], str | None] = {}


def _cu_path(top: DIE) -> str | None:
    """Returns the full path of the compile unit of top DIE ``top`` (DW_AT_name joined to
    DW_AT_comp_dir, normalised), or None without a name."""
    name = top.attributes.get("DW_AT_name")
    if name is None:
        return None
    comp_dir = top.attributes.get("DW_AT_comp_dir")
    where = _str(comp_dir.value) if comp_dir is not None else ""
    return os.path.normpath(os.path.join(where, _str(name.value)))


def path_tail(a: str, b: str) -> int:
    """Returns how many trailing components paths ``a`` and ``b`` share (``WORK/tree/a/util.c``
    and ``/src/a/util.c``: 2; and ``/src/b/util.c``: 1, the basename only)."""
    n = 0
    for x, y in zip(reversed(a.split("/")), reversed(b.split("/")), strict=False):
        if x != y:
            break
        n += 1
    return n


def object_source_path(path: str | os.PathLike[str]) -> str | None:
    """Returns the full path of the source file a relocatable object was compiled from,
    as its DWARF names it (its first compile unit's DW_AT_comp_dir and DW_AT_name), or
    None without debug info. Read once per version of the file."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise ElfError(f"cannot read {p}: {err.strerror}") from err
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _OBJECT_PATHS:
        return _OBJECT_PATHS[key]
    try:
        dwarf = object_dwarf(p)
        found = None
        if dwarf is not None:
            cu = next(dwarf.iter_CUs(), None)
            found = _cu_path(cu.get_top_DIE()) if cu is not None else None
    except OSError as err:
        raise ElfError(f"cannot read {p}: {err.strerror}") from err
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError) as err:
        raise ElfError(f"{p}: unreadable debug info: {err}") from err
    if len(_OBJECT_PATHS) >= _OBJECT_PATHS_KEPT:
        _OBJECT_PATHS.pop(next(iter(_OBJECT_PATHS)))
    _OBJECT_PATHS[key] = found
    return found


def _aranges(elf: ELFFile) -> list[tuple[int, int, int]]:
    """Returns (start, length, CU offset) of every range of ``.debug_aranges`` (empty
    without one), unpacked in bulk: pyelftools parses it entry by entry, seconds on QEMU."""
    sec = elf.get_section_by_name(".debug_aranges")
    if sec is None or sec["sh_type"] == "SHT_NOBITS":
        return []
    raw = sec.data()
    out: list[tuple[int, int, int]] = []
    at = 0
    while at + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, at)
        if length == _DWARF64_ESCAPE:
            (length,) = struct.unpack_from("<Q", raw, at + 4)
            head, offset_fmt, body = at + 12, "<Q", 8
        else:
            head, offset_fmt, body = at + 4, "<I", 4
        end = head + length
        if end > len(raw) or head + 2 + body + 2 > end:
            raise ElfError(f".debug_aranges: a set at {at:#x} runs past the section")
        (cu_offset,) = struct.unpack_from(offset_fmt, raw, head + 2)
        addr_size, seg_size = raw[head + 2 + body], raw[head + 3 + body]
        if addr_size != _ADDRESS_SIZE or seg_size != 0:
            raise ElfError(f".debug_aranges: address size {addr_size}, segment size {seg_size}")
        first = head + 4 + body
        first += -(first - at) % 16  # tuples are aligned to twice the address size
        pairs = end - first - (end - first) % 16
        for start, size in struct.iter_unpack("<QQ", raw[first : first + pairs]):
            if start == 0 and size == 0:
                break
            out.append((start, size, cu_offset))
        at = end
    return out


def unit_source_paths(
    elf: ELFFile,
    basename: str,
    units: Mapping[int, Sequence[int]],
    path: str = "",
) -> dict[int, str]:
    """Returns {unit: full path of its compile unit} for the groups of static symbols of a
    linked binary in ``units`` (a key: the addresses of its symbols, functions and
    variables), all from source files named ``basename``; a unit no CU is found for is
    left out (no debug info, or a CU without DW_AT_name).

    A unit's CU is the one ``.debug_aranges`` assigns one of its addresses to; else (no
    aranges, or only variables) the CU of that basename with a function starting
    (DW_AT_low_pc) or a variable located (DW_OP_addr) at one of its addresses. Raises
    ElfError if the DWARF cannot be read."""
    out: dict[int, str] = {}
    if not units or not has_debug_info(elf):
        return out
    try:
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        wanted = {a: unit for unit, addrs in units.items() for a in addrs}
        ordered = sorted(wanted)
        for start, size, cu_offset in _aranges(elf):
            at = bisect_left(ordered, start)
            hit = {wanted[a] for a in ordered[at : bisect_left(ordered, start + size)]}
            if hit - out.keys():
                found = _cu_path(dwarf.get_CU_at(cu_offset).get_top_DIE())
                if found is not None:
                    out.update(dict.fromkeys(hit - out.keys(), found))
        rest = {a: u for a, u in wanted.items() if u not in out}
        if rest:
            for cu in dwarf.iter_CUs():
                top = cu.get_top_DIE()
                if _basename(top) != basename:
                    continue
                found = _cu_path(top)
                hit = _cu_addresses(cu) & rest.keys()
                if found is not None:
                    out.update({rest[a]: found for a in hit})
                rest = {a: u for a, u in rest.items() if u not in out}
                if not rest:
                    break
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError) as err:
        raise ElfError(f"{path}: unreadable debug info: {err}") from err
    return out


def _cu_addresses(cu: CompileUnit) -> set[int]:
    """Returns the entry addresses of the functions and the addresses of the variables
    (static storage: DW_OP_addr) that compile unit ``cu`` defines."""
    out: set[int] = set()
    for die in cu.iter_DIEs():
        a = die.attributes
        if die.tag == "DW_TAG_subprogram" and "DW_AT_low_pc" in a:
            if a["DW_AT_low_pc"].form == "DW_FORM_addr":
                out.add(a["DW_AT_low_pc"].value)
        elif die.tag == "DW_TAG_variable" and "DW_AT_location" in a:
            loc = a["DW_AT_location"]
            if (
                loc.form == "DW_FORM_exprloc"
                and len(loc.value) == 1 + _ADDRESS_SIZE
                and loc.value[0] == _DW_OP_ADDR
            ):
                out.add(int.from_bytes(bytes(loc.value[1:]), "little"))
    return out
