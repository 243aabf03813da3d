"""The reference binary: the linked ELF executable a running process was started from.

Gives its GNU build-id, its symbols (with the source file each local symbol came from,
so that ``static`` functions and variables of the same name in different files can be
told apart) and its bytes at link-time virtual addresses.

Static symbols and their files: ``.symtab`` lists each linked object's local symbols
after an STT_FILE entry that names its source by basename only, so two ``util.c`` of
different directories (QEMU's ``net/vhost-vdpa.c`` and ``hw/virtio/vhost-vdpa.c``) give
two groups of one name. Each group is a *unit*, numbered by its STT_FILE entry
(:attr:`Symbol.unit`); :meth:`Binary.match_source` tells which unit an object's statics
are (:class:`SourceMatch`): the only unit of that basename, else the one whose compile
unit's full path (DWARF) matches the object's, else the one whose statics the original
object has; a lookup that still cannot tell the units apart is refused, naming both.
"""

from __future__ import annotations

import io
import mmap
import os
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import Section, SymbolTableSection

from patchbox.arch import get_arch_by_machine
from patchbox.elf import dwarf, segments
from patchbox.elf.buildid import read_build_id
from patchbox.elf.objfile import ObjectFile, ObjSymbol
from patchbox.elf.records import PT, SHN_UNDEF, SYM, cstring, sym_bind, sym_type
from patchbox.errors import ElfError, ExtractError

__all__ = [
    "Symbol",
    "Binary",
    "SourceMatch",
    "SymbolsMatch",
    "compare_loaded",
    "debuglink",
    "strip_version",
]

_ELFCLASS_BITS = 64  # pyelftools' elfclass of an ELF64 file
_FILE_NAMES: dict[tuple[str, int, int, int, int], frozenset[str]] = {}
_TABLES_KEPT = 4  # symbol tables of binaries kept at most (the oldest forgotten first)
_TABLES: dict[
    tuple[str, int, int, int, int], tuple[list[Symbol], set[str], dict[str, list[Symbol]]]
] = {}


@dataclass(frozen=True)
class Symbol:
    """One defined or undefined symbol of the reference binary's ``.symtab``."""

    name: str  # without the ``@VERSION`` suffix the linker adds to versioned symbols
    address: int  # link-time virtual address (0 for undefined symbols)
    size: int
    type: str  # FUNC, OBJECT, NOTYPE, TLS, ... (pyelftools' names: GNU IFUNC is LOOS)
    bind: str  # LOCAL, GLOBAL, WEAK
    source_file: str | None  # the preceding STT_FILE for LOCAL symbols, else None
    defined: bool = True
    unit: int = -1  # LOCAL symbols: the ordinal of the preceding STT_FILE (one object's)

    @property
    def is_local(self) -> bool:
        """Returns True for a LOCAL (``static``) symbol."""
        return self.bind == "LOCAL"


def strip_version(name: str) -> str:
    """Returns ``name`` without a ``@VERSION`` / ``@@VERSION`` suffix (``stdout@GLIBC_2.2.5``)."""
    at = name.find("@")
    return name if at <= 0 else name[:at]


def _map(path: Path, what: str) -> mmap.mmap | io.BytesIO:
    try:
        with open(path, "rb") as f:
            try:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                return io.BytesIO(b"")
    except OSError as err:
        raise ElfError(f"cannot read {what} {path}: {err.strerror}") from err


def _is_symtab(sec: object) -> bool:
    return isinstance(sec, SymbolTableSection) and sec["sh_type"] == "SHT_SYMTAB"


DEBUG_ROOT = Path("/usr/lib/debug")


def debuglink(elf: ELFFile) -> tuple[str, int] | None:
    """Returns (file name, CRC-32) of ``.gnu_debuglink``, or None."""
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    raw = sec.data()
    end = raw.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3
    crc = int.from_bytes(raw[crc_at : crc_at + 4], "little") if len(raw) >= crc_at + 4 else 0
    return raw[:end].decode(errors="replace"), crc


def _candidates(path: Path, elf: ELFFile) -> list[tuple[str, int | None]]:
    """Returns (candidate, CRC-32 it must have, None for a build-id path) in GDB's order."""
    root = Path(os.environ.get("PATCHBOX_DEBUG_ROOT", DEBUG_ROOT))
    out: list[tuple[str, int | None]] = []
    bid = read_build_id(path)
    if bid is not None and len(bid) > 1:
        out.append((str(root / ".build-id" / bid[:1].hex() / f"{bid[1:].hex()}.debug"), None))
    link = debuglink(elf)
    if link is not None:
        real = Path(os.path.realpath(path)).parent
        for where in (
            real / link[0],
            real / ".debug" / link[0],
            root / str(real).lstrip("/") / link[0],
        ):
            out.append((str(where), link[1]))
    return out


def debug_file_candidates(path: Path, elf: ELFFile) -> list[str]:
    """Returns where GDB looks for ``path``'s separate debug file, in order: the build-id
    path under /usr/lib/debug, then the ``.gnu_debuglink`` name beside the binary, in its
    ``.debug/`` directory and under /usr/lib/debug (``$PATCHBOX_DEBUG_ROOT`` moves it)."""
    return [c for c, _crc in _candidates(path, elf)]


def find_debug_file(path: Path, elf: ELFFile) -> Path | None:
    """Returns ``path``'s separate debug file (:func:`debug_file_candidates`; a debuglink
    candidate must have the CRC-32 the link names), or None."""
    for cand, crc in _candidates(path, elf):
        p = Path(cand)
        if not p.is_file() or os.path.samefile(p, path):
            continue
        if crc and zlib.crc32(p.read_bytes()) != crc:
            continue
        return p
    return None


@dataclass(frozen=True)
class SymbolsMatch:
    """How the file the symbols come from was matched to the binary: by build-id, or (a
    rebuild elsewhere, whose debug sections and so build-id differ) by its loaded bytes."""

    path: Path
    how: str  # "self" | "build-id" | "loaded-bytes"
    build_id: bytes | None  # the symbols file's own build-id
    sections: int = 0  # allocated sections compared byte for byte ("loaded-bytes")
    nbytes: int = 0

    def meta(self) -> dict[str, str]:
        """Returns the patch meta entries recording the match (nothing for "self")."""
        if self.how == "self":
            return {}
        out = {"symbols": str(self.path), "symbols_match": self.how}
        if self.how == "loaded-bytes":
            out["symbols_build_id"] = self.build_id.hex() if self.build_id else "none"
            out["symbols_compared"] = f"{self.sections} sections, {self.nbytes} bytes"
        return out


@dataclass(frozen=True)
class SourceMatch:
    """Which units of the reference binary (groups of static symbols, one per linked
    object: :attr:`Symbol.unit`) hold the statics of one object file, and how that was
    told (:meth:`Binary.match_source`)."""

    name: str  # the object's source file as its STT_FILE names it (a basename with GCC)
    path: str | None  # its full path (DWARF DW_AT_comp_dir + DW_AT_name); None without -g
    units: tuple[int, ...]  # one: decided; none: no statics of that file; more: undecided
    how: str  # "name" (the only unit of that name), "dwarf", "symbols" or "undecided"

    def split(self) -> tuple[SourceMatch, ...]:
        """Returns one decided match per unit this one may be."""
        return tuple(SourceMatch(self.name, self.path, (u,), self.how) for u in self.units)


_SHF_ALLOC = 0x2


def _alloc_sections(elf: ELFFile) -> dict[str, Section]:
    """Returns name -> section of every allocated section except the build-id note, the one
    loaded thing a rebuild elsewhere changes."""
    return {
        sec.name: sec
        for sec in elf.iter_sections()
        if sec["sh_flags"] & _SHF_ALLOC and sec.name != ".note.gnu.build-id"
    }


def compare_loaded(
    target: ELFFile, target_path: Path, rebuild: ELFFile, rebuild_path: Path
) -> tuple[int, int]:
    """Returns (sections, bytes) compared when every allocated section of ``target`` is in
    ``rebuild`` at the same address with the same size, type and bytes (bss: same size);
    raises ElfError naming the first section and offset that differ."""
    mine = _alloc_sections(target)
    theirs = _alloc_sections(rebuild)
    nbytes = 0
    for name, sec in mine.items():
        osec = theirs.get(name)
        if osec is None:
            raise ElfError(
                f"{rebuild_path} is not a build of {target_path}: it has no section {name}"
            )
        addr, size, oaddr, osize = sec["sh_addr"], sec["sh_size"], osec["sh_addr"], osec["sh_size"]
        if (oaddr, osize) != (addr, size):
            raise ElfError(
                f"{rebuild_path} is not a build of {target_path}: section {name} is "
                f"[{oaddr:#x}, +{osize:#x}) there, [{addr:#x}, +{size:#x}) here"
            )
        if sec["sh_type"] == "SHT_NOBITS":
            continue
        if osec["sh_type"] == "SHT_NOBITS":
            raise ElfError(
                f"{rebuild_path} holds no bytes of section {name} (a separate debug file?): "
                f"its build-id differs from {target_path}'s, so only a full rebuild, whose "
                f"loaded bytes can be compared, may lend its symbols"
            )
        a, b = sec.data(), osec.data()
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ElfError(
                f"{rebuild_path} is not a build of {target_path}: section {name} differs at "
                f"offset {at:#x} (address {addr + at:#x})"
            )
        nbytes += size
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise ElfError(
            f"{rebuild_path} is not a build of {target_path}: it loads sections "
            f"{', '.join(extra)} that the binary does not"
        )
    return len(mine), nbytes


def _same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.basename(a) == os.path.basename(b)


def _file_key(path: Path) -> tuple[str, int, int, int, int] | None:
    """Returns the identity of the file ``path`` (real path, device, inode, size, mtime),
    None if it cannot be read."""
    try:
        st = os.stat(path)
        return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _link_view(obj: ObjectFile, sym: ObjSymbol) -> tuple[bytes, list[bool]] | None:
    """Returns (bytes, mask) of ``sym`` in ``obj``: its section's bytes (zeros for bss)
    and, per byte, whether the link fills it in (a relocation field, and the bytes
    before one the linker may relax: ``Arch.relax_before``); None if a relocation there
    may rewrite more (TLS)."""
    sec = obj.get_symbol_section(sym)
    start, end = sym.value, sym.value + sym.size
    data = bytes(sym.size) if sec.is_nobits else sec.data[start:end]
    if len(data) != sym.size:
        return None
    mask = [False] * sym.size
    for rel in obj.get_relocations(sec):
        if not start - 4 < rel.offset < end:
            continue
        rtype = obj.arch.relocs.get(rel.type)
        if rtype is None or rtype.is_tls:
            return None
        lo = rel.offset if rtype.field_only else rel.offset - obj.arch.relax_before
        for at in range(max(lo, start), min(rel.offset + rtype.size, end)):
            mask[at - start] = True
    return data, mask


def _of(sym: Symbol, source: str | SourceMatch) -> bool:
    """Returns True if LOCAL ``sym`` is a static of ``source``: one of its units, or (a
    file name) a unit of that basename."""
    if isinstance(source, SourceMatch):
        return sym.unit in source.units
    return _same_file(sym.source_file, source)


class Binary:
    """A linked ELF executable read with pyelftools (the *reference binary*); ``arch``
    is its architecture, from ``e_machine``."""

    def __init__(self, path: str | Path, symbols: str | Path | None = None) -> None:
        """Opens ``path``. Its symbols (and DWARF) come from ``symbols`` (an unstripped
        build of the same binary: same build-id), else from the binary itself, else from
        its separate debug file (:func:`find_debug_file`)."""
        self.path = Path(path)
        self._buf = _map(self.path, "reference binary")
        try:
            self.elf = ELFFile(cast(BinaryIO, self._buf))  # mmap reads like a binary file
            machine = self.elf["e_machine"]
            etype = self.elf["e_type"]
            symtab = self.elf.get_section_by_name(".symtab")
        except (_PyElfError, ValueError, OSError) as err:
            raise ElfError(f"{self.path}: not a readable ELF file: {err}") from err
        #: the architecture of the binary (:class:`patchbox.arch.Arch`)
        self.arch = get_arch_by_machine(machine, str(self.path))
        if etype not in ("ET_EXEC", "ET_DYN"):
            raise ElfError(f"{self.path}: not a linked executable ({etype})")
        #: the program headers (:mod:`patchbox.elf.segments`)
        self.segments = segments.read_program_headers(cast(BinaryIO, self._buf), str(self.path))
        #: where symbols and DWARF are read: this file, or a debug file / unstripped build
        self.symbols_path = self.path
        self.symbols_match = SymbolsMatch(self.path, "self", None)
        self.dwarf = self.elf
        self._debug_buf: mmap.mmap | io.BytesIO | None = None
        if symbols is not None or not _is_symtab(symtab):
            symtab = self._open_symbols(symbols)
        assert isinstance(symtab, SymbolTableSection)
        self._load_symbols(symtab)
        self._units_by_name: dict[str, list[int]] | None = None
        self._unit_paths: dict[int, str | None] = {}

    def _open_symbols(self, symbols: str | Path | None) -> Section | None:
        """Reads symbols and DWARF from ``symbols`` (an unstripped build), else from the
        separate debug file; returns its ``.symtab``. Raises ElfError if there is none,
        if it is not a build of this binary, or has no symbol table."""
        found = Path(symbols) if symbols is not None else find_debug_file(self.path, self.elf)
        if found is None:
            tried = ", ".join(debug_file_candidates(self.path, self.elf))
            raise ElfError(
                f"{self.path} is stripped (no .symtab) and no separate debug file was found "
                f"({tried or 'no build-id, no .gnu_debuglink'}): install its debug "
                f"symbols (-dbgsym/-dbg package), or give the unstripped build of the same "
                f"source (--symbols)"
            )
        self._debug_buf = _map(found, "debug file")
        try:
            self.dwarf = ELFFile(cast(BinaryIO, self._debug_buf))
            symtab: Section | None = self.dwarf.get_section_by_name(".symtab")
        except (_PyElfError, ValueError, OSError) as err:
            raise ElfError(f"{found}: not a readable ELF file: {err}") from err
        self.symbols_match = self._match_symbols(found, given=symbols is not None)
        if not _is_symtab(symtab):
            raise ElfError(f"{found} has no symbol table (.symtab) either")
        self.symbols_path = found
        return symtab

    def _match_symbols(self, found: Path, given: bool) -> SymbolsMatch:
        """Returns how the symbols file ``found`` matches this binary: by build-id, or
        (a build ``given`` by the user) by the bytes it loads; raises ElfError if a debug
        file found by name has another build-id."""
        mine, theirs = read_build_id(self.path), read_build_id(found)
        if mine is not None and theirs == mine:
            return SymbolsMatch(found, "build-id", theirs)
        if not given:  # a debug file found by name: its build-id must agree
            raise ElfError(
                f"{found} is not a build of {self.path}: build-id "
                f"{theirs.hex() if theirs else 'none'} instead of "
                f"{mine.hex() if mine else 'none'}"
            )
        # A rebuild elsewhere: debug sections carry the build directory and so change
        # the build-id; the code and data the process runs must not differ.
        n, size = compare_loaded(self.elf, self.path, self.dwarf, found)
        return SymbolsMatch(found, "loaded-bytes", theirs, n, size)

    def _load_symbols(self, symtab: SymbolTableSection) -> None:
        """Reads the symbols of ``symtab`` (of :attr:`symbols_path`), or takes them from
        the cache: one `patchbox build` opens the reference binary several times, and
        QEMU's symbol table (100k symbols) is parsed once per version of its file."""
        key = _file_key(self.symbols_path)
        cached = _TABLES.get(key) if key is not None else None
        if cached is None:
            table = list(self._read_symbols(symtab))
            files = {os.path.basename(s.source_file) for s in table if s.source_file}
            by_name: dict[str, list[Symbol]] = defaultdict(list)
            for sym in table:
                if sym.defined:
                    by_name[sym.name].append(sym)
            cached = (table, files, by_name)
            if key is not None:
                if len(_TABLES) >= _TABLES_KEPT:
                    _TABLES.pop(next(iter(_TABLES)))
                _TABLES[key] = cached
        self._symbols, self._files, self._by_name = cached
        files_cached = _FILE_NAMES.get(key) if key is not None else None
        if files_cached is None:
            files_cached = self._file_names(symtab)
            if key is not None:
                _FILE_NAMES[key] = files_cached
        self._all_files: frozenset[str] = files_cached

    def _file_names(self, symtab: SymbolTableSection) -> frozenset[str]:
        """Returns the basenames of the STT_FILE entries of ``symtab``."""
        names = set()
        strtab = self.dwarf.get_section(symtab["sh_link"]).data()
        raw = symtab.data()
        for st_name, info, _o, _shndx, _v, _s in SYM.iter_table(
            raw, 0, len(raw) - len(raw) % SYM.size, str(self.path)
        ):
            if sym_type(info) == "FILE":
                name = cstring(strtab, st_name)
                if name:
                    names.add(os.path.basename(name))
        return frozenset(names)

    def _read_symbols(self, symtab: SymbolTableSection) -> Iterator[Symbol]:
        """Unpacks ``.symtab`` with :mod:`struct` in bulk (pyelftools' per-symbol parsing
        costs seconds on a program with tens of thousands of symbols); pyelftools otherwise."""
        if (
            self.elf.little_endian
            and self.elf.elfclass == _ELFCLASS_BITS
            and symtab["sh_entsize"] == SYM.size
        ):
            try:
                raw = symtab.data()
                strtab = self.dwarf.get_section(symtab["sh_link"]).data()
            except (_PyElfError, ValueError, OSError) as err:
                raise ElfError(f"{self.path}: corrupt symbol table: {err}") from err
            yield from self._unpack_symbols(raw, strtab)
            return
        yield from self._iter_symbols(symtab)

    def _unpack_symbols(self, raw: bytes, strtab: bytes) -> Iterator[Symbol]:
        source: str | None = None
        unit = -1
        for st_name, info, _other, shndx, value, size in SYM.iter_table(
            raw, 0, len(raw) - len(raw) % SYM.size, f"{self.path}: .symtab"
        ):
            name = cstring(strtab, st_name)
            stype = sym_type(info)
            if stype == "FILE":
                source = name or None
                unit += 1
                continue
            if stype == "SECTION" or not name:
                continue
            bind = sym_bind(info)
            yield Symbol(
                name=strip_version(name),
                address=value,
                size=size,
                type=stype,
                bind=bind,
                source_file=source if bind == "LOCAL" else None,
                defined=shndx != SHN_UNDEF,
                unit=unit if bind == "LOCAL" else -1,
            )

    def _iter_symbols(self, symtab: SymbolTableSection) -> Iterator[Symbol]:
        source: str | None = None
        unit = -1
        try:
            for sym in symtab.iter_symbols():
                stype = sym["st_info"]["type"]
                if stype == "STT_FILE":
                    source = sym.name or None
                    unit += 1
                    continue
                if stype == "STT_SECTION" or not sym.name:
                    continue
                bind = sym["st_info"]["bind"].removeprefix("STB_")
                defined = sym["st_shndx"] != "SHN_UNDEF"
                yield Symbol(
                    name=strip_version(sym.name),
                    address=sym["st_value"],
                    size=sym["st_size"],
                    type=stype.removeprefix("STT_"),
                    bind=bind,
                    source_file=source if bind == "LOCAL" else None,
                    defined=defined,
                    unit=unit if bind == "LOCAL" else -1,
                )
        except (_PyElfError, ValueError) as err:
            raise ElfError(f"{self.path}: corrupt symbol table: {err}") from err

    def close(self) -> None:
        """Releases the file mappings."""
        self._buf.close()
        if self._debug_buf is not None:
            self._debug_buf.close()

    def __enter__(self) -> Binary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity -------------------------------------------------------------------

    def build_id(self) -> bytes:
        """Returns the GNU build-id; raises ElfError if the binary has none."""
        found = read_build_id(self.path)
        if found is None:
            raise ElfError(
                f"{self.path} has no GNU build-id note: link it with -Wl,--build-id=sha1 "
                f"(`patchbox config --libs`)"
            )
        return found

    @property
    def is_pie(self) -> bool:
        """Returns True for a position-independent executable (ET_DYN)."""
        return bool(self.elf["e_type"] == "ET_DYN")

    @property
    def is_shared_library(self) -> bool:
        """Returns True for an ET_DYN that is not an executable: no PT_INTERP, no
        DF_1_PIE (:func:`patchbox.elf.segments.is_shared_library`)."""
        return segments.is_shared_library(cast(BinaryIO, self._buf), str(self.path))

    # -- symbols ----------------------------------------------------------------------

    def iter_symbols(self) -> Iterator[Symbol]:
        """Returns an iterator over the named symbols of ``.symtab`` (no FILE/SECTION)."""
        return iter(self._symbols)

    def source_files(self) -> set[str]:
        """Returns the basenames of every source file the symbol table names (STT_FILE):
        the compile units linked into the binary."""
        return set(self._all_files)

    def has_source_file(self, source_file: str | SourceMatch) -> bool:
        """Returns True if some local symbol of the binary comes from ``source_file``."""
        if isinstance(source_file, SourceMatch):
            return bool(source_file.units)
        return os.path.basename(source_file) in self._files

    def _units_named(self, basename: str) -> list[int]:
        """Returns the units (STT_FILE groups) of source file ``basename`` that define
        static symbols, in ``.symtab`` order."""
        if self._units_by_name is None:
            index: dict[str, list[int]] = defaultdict(list)
            seen: set[int] = set()
            for s in self._symbols:
                if s.is_local and s.defined and s.source_file and s.unit not in seen:
                    seen.add(s.unit)
                    index[os.path.basename(s.source_file)].append(s.unit)
            self._units_by_name = dict(index)
        return self._units_by_name.get(basename, [])

    def unit_paths(self, units: set[int] | list[int] | tuple[int, ...]) -> dict[int, str]:
        """Returns {unit: the full path of its compile unit} for those of ``units`` the
        binary's DWARF places (:func:`patchbox.elf.dwarf.unit_source_paths`); the DWARF is
        read once per file name, for every unit of that name."""
        missing = {u for u in units if u not in self._unit_paths}
        names = {
            os.path.basename(s.source_file)
            for s in self._symbols
            if s.unit in missing and s.source_file
        }
        for base in names:
            mine = set(self._units_named(base))
            addresses: dict[int, list[int]] = defaultdict(list)
            for s in self._symbols:
                if s.unit in mine and s.defined and s.address:
                    addresses[s.unit].append(s.address)
            try:
                found = dwarf.unit_source_paths(self.dwarf, base, addresses, str(self.symbols_path))
            except ElfError:
                found = {}  # unreadable DWARF tells nothing: the units stay unplaced
            for u in mine:
                self._unit_paths[u] = found.get(u)
        for u in missing:
            self._unit_paths.setdefault(u, None)
        return {u: p for u in units if (p := self._unit_paths.get(u)) is not None}

    def match_source(
        self, obj: ObjectFile, original: ObjectFile | None = None
    ) -> SourceMatch | None:
        """Returns which unit of this binary holds the statics of object ``obj`` (None if
        the object names no source file); the first rule that leaves one unit decides:

        1. ``name``: the only unit of its source file's basename (none: the binary has no
           statics of that file);
        2. ``dwarf``: the unit whose compile unit's full path shares the longest tail
           with the object's own (both from DWARF: ``-g``); a tail of more than the
           basename is needed, so a checkout or build directory elsewhere still decides
           (``WORK/tree/a/util.c`` is ``/src/a/util.c``, not ``/src/b/util.c``);
        3. ``symbols``: with ``original``, the object of the build that linked this
           binary (`patchbox build`'s original object), the only unit whose static
           functions and variables are all in it, same size, same bytes but for what the
           link fills in;
        4. ``undecided``: the units left. A lookup of a static that more than one of
           them defines is refused, naming their full paths (:meth:`find_symbol`).
        """
        if obj.source_file is None:
            return None
        cands = self._units_named(os.path.basename(obj.source_file))
        if len(cands) <= 1:
            return SourceMatch(obj.source_file, None, tuple(cands), "name")
        try:
            path = dwarf.object_source_path(obj.path)
        except ElfError:
            path = None
        if path is not None:
            tails = {u: dwarf.path_tail(path, p) for u, p in self.unit_paths(cands).items()}
            best = max(tails.values(), default=0)
            if best > 1:  # more than the basename; a unit DWARF does not place stays
                cands = [u for u in cands if tails.get(u, best) == best]
            if len(cands) == 1:
                return SourceMatch(obj.source_file, path, tuple(cands), "dwarf")
        if original is not None:
            fits = [u for u in cands if self._unit_is(u, original)]
            if len(fits) == 1:
                return SourceMatch(obj.source_file, path, tuple(fits), "symbols")
        return SourceMatch(obj.source_file, path, tuple(cands), "undecided")

    def _unit_is(self, unit: int, original: ObjectFile) -> bool:
        """Returns True if every static function and variable of ``unit`` is in object
        ``original`` (the linker only ever drops some) with the same name, type and size,
        and the same bytes but for what the link fills in (:func:`_link_view`)."""
        have: dict[tuple[str, str, int], list[ObjSymbol]] = defaultdict(list)
        for o in original.symbols:
            if o.is_local and o.defined and o.type in ("FUNC", "OBJECT") and o.name:
                have[(o.name, o.type, o.size)].append(o)
        mine = [
            s
            for s in self._symbols
            if s.unit == unit and s.defined and s.type in ("FUNC", "OBJECT")
        ]
        return bool(mine) and all(
            any(self._same_bytes(s, original, o) for o in have.get((s.name, s.type, s.size), []))
            for s in mine
        )

    def _same_bytes(self, sym: Symbol, obj: ObjectFile, osym: ObjSymbol) -> bool:
        """Returns True if ``osym`` of ``obj`` has ``sym``'s bytes in this binary but for
        what the link fills in; True too where that cannot be told (TLS code)."""
        view = _link_view(obj, osym)
        if view is None or not sym.size:
            return True
        want, mask = view
        try:
            got = self.read(sym.address, sym.size)
        except ElfError:
            return True
        return all(m or a == b for a, b, m in zip(want, got, mask, strict=True))

    def find_symbol(
        self,
        name: str,
        source_file: str | SourceMatch | None = None,
        *,
        local: bool | None = None,
    ) -> Symbol | None:
        """Returns the defined symbol ``name`` a reference from code of ``source_file``
        binds to, or None if the binary has none: patchbox's one lookup rule.

        ``source_file`` is an object's :class:`SourceMatch` (its statics are those of the
        units it names), or a file name (basenames compared: every unit of that name).
        A name of unknown binding (``local`` None: a function named on the command line or
        by PATCHBOX_ORIGINAL) binds to the static of ``source_file``
        if that file has one, else to the global; locals of other files never match.
        Without ``source_file``, a global wins, then the only local of that name.

        An object's own symbol knows its binding: a LOCAL one (``local`` True) binds only
        to the static of ``source_file`` (None without one), a GLOBAL one (``local``
        False) only to the global. Two candidates that cannot be told apart raise
        ExtractError naming their files.
        """
        if local is True:
            return self._find_local(name, source_file) if source_file is not None else None
        if local is False:
            return self._find_global(name)
        if source_file is not None:
            return self._find_local(name, source_file) or self._find_global(name)
        sym = self._find_global(name)
        if sym is not None:
            return sym
        locals_ = [s for s in self._by_name.get(name, []) if s.is_local]
        if len(locals_) > 1:
            raise ExtractError(self._ambiguous(name, locals_, ""))
        return locals_[0] if locals_ else None

    def _find_global(self, name: str) -> Symbol | None:
        """Returns the defined GLOBAL (or WEAK) symbol ``name``, else the hidden one of
        that name, else None.

        A symbol of hidden (or internal) visibility is global in its object but the link
        makes it LOCAL; ld lists those after an unnamed STT_FILE, so they have no source
        file here. Hidden symbols are unique across a link, so the name alone finds one;
        two such locals (assembly without STT_FILE) raise ExtractError.
        """
        for sym in self._by_name.get(name, []):
            if not sym.is_local:
                return sym
        hidden = [s for s in self._by_name.get(name, []) if s.is_local and not s.source_file]
        if len(hidden) > 1:
            raise ExtractError(self._ambiguous(name, hidden, " (hidden or file-less)"))
        return hidden[0] if hidden else None

    def _find_local(self, name: str, source_file: str | SourceMatch) -> Symbol | None:
        """Returns the LOCAL symbol ``name`` defined by ``source_file`` or None.

        Raises ExtractError if two units it may be both define it.
        """
        mine = [s for s in self._by_name.get(name, []) if s.is_local and _of(s, source_file)]
        if len(mine) > 1:
            if isinstance(source_file, SourceMatch):
                raise ExtractError(self._undecided(name, mine, source_file))
            raise ExtractError(self._ambiguous(name, mine, f" in {source_file}"))
        return mine[0] if mine else None

    def get_symbol(self, name: str, source_file: str | SourceMatch | None = None) -> Symbol:
        """Returns the defined symbol ``name`` (see find_symbol); raises if there is none."""
        sym = self.find_symbol(name, source_file)
        if sym is not None:
            return sym
        others = [s for s in self._by_name.get(name, []) if s.is_local]
        if source_file is not None and others:
            file = source_file.name if isinstance(source_file, SourceMatch) else source_file
            raise ExtractError(
                f"{self.path}: no symbol {name!r} from {os.path.basename(file)}; "
                f"static {name!r} exists only in "
                f"{', '.join(sorted({s.source_file or '?' for s in others}))}"
            )
        raise ExtractError(f"{self.path}: no symbol {name!r}")

    def iter_locals(self, source_file: str | SourceMatch) -> Iterator[Symbol]:
        """Returns an iterator over the defined LOCAL symbols of one source file."""
        return (s for s in self._symbols if s.defined and s.is_local and _of(s, source_file))

    def _where(self, cands: list[Symbol]) -> str:
        """Returns each candidate's file (its full path where DWARF says) and address."""
        paths = self.unit_paths({s.unit for s in cands})
        return ", ".join(
            f"{paths.get(s.unit) or s.source_file or '?'} at {s.address:#x}" for s in cands
        )

    def _ambiguous(self, name: str, cands: list[Symbol], where: str) -> str:
        return (
            f"{self.path}: symbol {name!r}{where} is ambiguous: static symbols of that "
            f"name in {self._where(cands)}; name the source file"
        )

    def _undecided(self, name: str, cands: list[Symbol], source: SourceMatch) -> str:
        if source.path is None:
            why = "the object has no debug info naming its directory: compile it with -g"
        elif len(self.unit_paths({s.unit for s in cands})) < len(cands):
            why = (
                f"{self.path} has no debug info naming theirs: build it with -g (or give "
                f"its debug file)"
            )
        else:
            why = (
                f"{source.path} matches none of them better than another: compile it in "
                f"a copy of the tree, where its path ends in the same directories"
            )
        return (
            f"{self.path}: static {name!r} of {source.path or source.name} is ambiguous: "
            f"static symbols of that name in {self._where(cands)}; {why}"
        )

    # -- bytes ------------------------------------------------------------------------

    def read(self, address: int, n: int) -> bytes:
        """Returns ``n`` bytes at link-time virtual ``address`` from the PT_LOAD segments.

        Bytes past a segment's file size but within its memory size (bss) read as zero;
        a range not inside one segment raises ElfError.
        """
        for seg in self.segments:
            start, memsz = seg.p_vaddr, seg.p_memsz
            if seg.p_type != PT["LOAD"]:
                continue
            if start <= address and address + n <= start + memsz:
                rel = address - start
                in_file = max(0, min(n, seg.p_filesz - rel))
                self._buf.seek(seg.p_offset + rel)
                data = self._buf.read(in_file)
                if len(data) != in_file:
                    raise ElfError(f"{self.path}: truncated at {address:#x}")
                return data + bytes(n - in_file)
        raise ElfError(f"{self.path}: [{address:#x}, +{n}) is not inside one loadable segment")
