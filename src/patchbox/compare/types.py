"""Struct and union layouts from an object's DWARF, compared between two builds.

Code replacement cannot change the layout of data the running program already holds: a
new field in a struct, a member moved or resized. The objects' own bytes do not always
show it (a struct used only through pointers changes no variable's size), so the types
are read from DWARF (``-g``): every named ``struct``/``union`` (or anonymous one named
by a typedef) with its size and its members' names, offsets and types. Only the
top-level entries of each compile unit and the members of aggregates are read, not the
functions' subtrees, which keeps this cheap on QEMU-sized objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.dwarf.die import DIE

from patchbox.elf.dwarf import object_dwarf
from patchbox.errors import ElfError

__all__ = ["Member", "Aggregate", "read_layouts", "layout_changes"]

_MAX_DEPTH = 8  # type references followed at most (a pointer to a pointer to ...)
_AGGREGATES = ("DW_TAG_structure_type", "DW_TAG_union_type")


@dataclass(frozen=True)
class Member:
    """One member of an aggregate: name, offset (bits), size (bits, 0 if not a bit-field)
    and a short description of its type."""

    name: str
    bit_offset: int
    bit_size: int
    type: str


@dataclass(frozen=True)
class Aggregate:
    """A struct or union layout."""

    kind: str  # "struct" | "union"
    name: str
    size: int
    members: tuple[Member, ...]

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def _str(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _name(die: DIE) -> str | None:
    a = die.attributes.get("DW_AT_name")
    return _str(a.value) if a is not None else None


def _type(die: DIE, depth: int = 0) -> str:
    """Returns a short type description: names, pointers, arrays and sizes."""
    if "DW_AT_type" not in die.attributes or depth > _MAX_DEPTH:
        return "void"
    t = die.get_DIE_from_attribute("DW_AT_type")
    tag = str(t.tag).removeprefix("DW_TAG_")
    size = t.attributes.get("DW_AT_byte_size")
    sz = f"/{size.value}" if size is not None else ""
    if tag in ("pointer_type", "reference_type"):
        return "*"  # any pointer: its size is what matters here
    if tag in ("const_type", "volatile_type", "restrict_type", "atomic_type"):
        return _type(t, depth + 1)
    if tag == "array_type":
        dims = []
        for sub in t.iter_children():
            ub = sub.attributes.get("DW_AT_upper_bound") or sub.attributes.get("DW_AT_count")
            dims.append(str(ub.value) if ub is not None and isinstance(ub.value, int) else "?")
        return f"{_type(t, depth + 1)}[{']['.join(dims)}]"
    name = _name(t)
    if tag == "typedef":
        return f"{name}={_type(t, depth + 1)}"
    return f"{tag} {name or '<anon>'}{sz}"


def _member(die: DIE) -> Member:
    a = die.attributes
    loc = a.get("DW_AT_data_member_location")
    byte_off = loc.value if loc is not None and isinstance(loc.value, int) else 0
    bit_off = a["DW_AT_data_bit_offset"].value if "DW_AT_data_bit_offset" in a else byte_off * 8
    bit_size = a["DW_AT_bit_size"].value if "DW_AT_bit_size" in a else 0
    return Member(_name(die) or "<anon>", bit_off, bit_size, _type(die))


def read_layouts(path: str | os.PathLike[str]) -> dict[str, Aggregate]:
    """Returns {"struct NAME": layout} of the named aggregates defined in the object's
    DWARF (empty without debug info); raises ElfError if it cannot be read."""
    out: dict[str, Aggregate] = {}
    try:
        dwarf = object_dwarf(path)
        if dwarf is not None:
            for cu in dwarf.iter_CUs():
                anon: dict[int, DIE] = {}
                for die in cu.get_top_DIE().iter_children():
                    tag = die.tag
                    if tag in _AGGREGATES and "DW_AT_declaration" not in die.attributes:
                        name = _name(die)
                        if name is None:
                            anon[die.offset] = die
                        else:
                            agg = _aggregate(die, name)
                            out.setdefault(agg.label, agg)
                    elif tag == "DW_TAG_typedef" and "DW_AT_type" in die.attributes:
                        target = die.get_DIE_from_attribute("DW_AT_type")
                        if target.offset in anon or (
                            target.tag in _AGGREGATES and _name(target) is None
                        ):
                            agg = _aggregate(target, _name(die) or "<anon>", typedef=True)
                            out.setdefault(agg.label, agg)
    except OSError as err:
        raise ElfError(f"cannot read {path}: {err.strerror}") from err
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError) as err:
        raise ElfError(f"{path}: unreadable debug info: {err}") from err
    return out


def _aggregate(die: DIE, name: str, typedef: bool = False) -> Aggregate:
    kind = "struct" if die.tag == "DW_TAG_structure_type" else "union"
    size = die.attributes["DW_AT_byte_size"].value if "DW_AT_byte_size" in die.attributes else 0
    members = tuple(_member(m) for m in die.iter_children() if m.tag == "DW_TAG_member")
    return Aggregate(f"{kind} (typedef)" if typedef else kind, name, size, members)


def layout_changes(before: dict[str, Aggregate], after: dict[str, Aggregate]) -> list[str]:
    """Returns one description per aggregate defined in both whose layout differs."""
    out = []
    for label in sorted(before.keys() & after.keys()):
        a, b = before[label], after[label]
        if a == b:
            continue
        what = []
        if a.size != b.size:
            what.append(f"size {a.size} -> {b.size} bytes")
        old = {m.name: m for m in a.members}
        new = {m.name: m for m in b.members}
        for n in new.keys() - old.keys():
            what.append(f"member {n!r} added at +{new[n].bit_offset // 8}")
        for n in old.keys() - new.keys():
            what.append(f"member {n!r} removed")
        for n in sorted(old.keys() & new.keys()):
            if old[n] != new[n]:
                o, m = old[n], new[n]
                if o.bit_offset != m.bit_offset:
                    what.append(f"member {n!r} moved +{o.bit_offset // 8} -> +{m.bit_offset // 8}")
                if (o.bit_size, o.type) != (m.bit_size, m.type):
                    what.append(f"member {n!r} type changed")
        if not what:
            what.append("members reordered")
        out.append(f"{label}: {'; '.join(what)}")
    return out
