"""The ELF record layouts (patchbox.elf.records) and the readers built on them agree with
pyelftools (tests/elf_reference.py): the fast object reader on IFUNC and UNIQUE symbols,
an extended section index (more than 0xff00 sections), compiled objects with debug
info, the agent's own objects and truncated files; the reference binary's bulk symbol
reader against its pyelftools path; the program-header walk, the dynamic table and the
build-id on real executables and libraries; one ident check for every reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from elf_reference import dynamic_pyelftools, load_object_pyelftools, program_headers_pyelftools
from helpers import compile_c
from patchbox.arch.x86_64 import RELOC_TYPES
from patchbox.elf.binary import Binary
from patchbox.elf.buildid import read_build_id
from patchbox.elf.exports import dynamic_exports
from patchbox.elf.fastread import load_object
from patchbox.elf.records import SYM, sym_bind, sym_type
from patchbox.elf.segments import (
    first_load_vaddr,
    has_interp,
    is_shared_library,
    read_dynamic,
    read_program_headers,
)
from patchbox.errors import ElfError

# 65,300 one-instruction sections push the section count past SHN_LORESERVE (0xff00):
# section indices of symbols go through .symtab_shndx (SHN_XINDEX).
MANY = 65300
TAIL = """
.section .text.resolver,"ax",@progbits
.type resolve_it,@function
resolve_it:
    lea f0(%rip),%rax
    ret
.globl ifn
.type ifn,@gnu_indirect_function
.set ifn,resolve_it
.section .data.uniq,"awG",@progbits,uniq,comdat
.globl uniq
.type uniq,@gnu_unique_object
.size uniq,4
uniq:
.long 7
.section .data.ptrs,"aw",@progbits
.quad f{last}
.quad ifn
.quad uniq
"""


def _assemble(tmp: Path, name: str, functions: int) -> Path:
    src = tmp / f"{name}.s"
    with src.open("w") as f:
        for i in range(functions):
            f.write(
                f'.section .text.f{i},"ax",@progbits\n.globl f{i}\n.type f{i},@function\n'
                f"f{i}:\n\tret\n"
            )
        f.write(TAIL.format(last=functions - 1))
    obj = tmp / f"{name}.o"
    subprocess.run(["as", str(src), "-o", str(obj)], check=True)
    return obj


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _assemble(tmp_path_factory.mktemp("records"), "many", MANY)


@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _assemble(tmp_path_factory.mktemp("records"), "few", 3)


def test_fast_reader_equals_pyelftools_with_extended_index(many: Path) -> None:
    fast, ref = load_object(many), load_object_pyelftools(many)
    assert len(fast.sections) > 0xFF00
    assert fast.sections == ref.sections
    assert fast.symbols == ref.symbols
    assert fast.relocations == ref.relocations
    last = next(s for s in fast.symbols if s.name == f"f{MANY - 1}")
    assert last.defined and last.shndx > 0xFF00
    assert fast.get_symbol_section(last).name == f".text.f{MANY - 1}"


def test_ifunc_and_unique_named_as_pyelftools(few: Path) -> None:
    obj = load_object(few)
    by_name = {s.name: s for s in obj.symbols}
    # pyelftools names GNU's STT_GNU_IFUNC and STB_GNU_UNIQUE (both 10) LOOS.
    assert (by_name["ifn"].type, by_name["ifn"].bind) == ("LOOS", "GLOBAL")
    assert (by_name["uniq"].type, by_name["uniq"].bind) == ("OBJECT", "LOOS")
    assert obj.symbols == load_object_pyelftools(few).symbols
    with open(few, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        raw = symtab.data()
        for ours, theirs in zip(
            SYM.iter_table(raw, 0, len(raw), "t"), symtab.iter_symbols(), strict=True
        ):
            fields = dict(zip(SYM.fields, ours, strict=True))
            assert fields["st_name"] == theirs["st_name"]
            assert fields["st_value"] == theirs["st_value"]
            assert fields["st_size"] == theirs["st_size"]
            assert "STT_" + sym_type(fields["st_info"]) == theirs["st_info"]["type"]
            assert "STB_" + sym_bind(fields["st_info"]) == theirs["st_info"]["bind"]


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_object_is_an_elf_error(few: Path, tmp_path: Path, keep: float) -> None:
    data = few.read_bytes()
    cut = tmp_path / "cut.o"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ElfError):
        load_object(cut)


def test_binary_bulk_symbols_equal_pyelftools(tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text(
        "static int impl(void) { return 3; }\n"
        "static int (*pick(void))(void) { return impl; }\n"
        'int ifn(void) __attribute__((ifunc("pick")));\n'
        "static int counter;\n"
        "int main(void) { return ifn() + counter; }\n"
    )
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-O1", str(src), "-o", str(exe)], check=True)
    with Binary(exe) as b:
        bulk = list(b.iter_symbols())
        symtab = b.elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        assert bulk == list(b._iter_symbols(symtab))
        assert any(s.name == "ifn" and s.type == "LOOS" for s in bulk)


def test_relocation_names_match_pyelftools() -> None:
    known = {v: k for k, v in ENUM_RELOC_TYPE_x64.items() if isinstance(v, int)}
    for rtype in RELOC_TYPES.values():
        if rtype.number in known:
            assert known[rtype.number] == rtype.name
    pc = {t.name for t in RELOC_TYPES.values() if t.pcrel}
    assert {"R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_GOTPCREL", "R_X86_64_PC64"} <= pc
    assert "R_X86_64_64" not in pc and "R_X86_64_32S" not in pc


def test_fast_reader_equals_pyelftools_on_real_objects(tmp_path: Path, agent_dir: Path) -> None:
    """Objects as gcc writes them (debug sections and their relocations, rodata strings,
    bss) and the agent's own objects."""
    src = (
        "#include <stdio.h>\n"
        "static int counter;\n"
        "int limit = 10;\n"
        'const char *name(void) { return "x"; }\n'
        'int f(int x) { printf("%d\\n", x); return x * 3 + limit + counter++; }\n'
    )
    compiled = compile_c(src, tmp_path / "real.o", obj=True, extra=["-g"])
    objects = [compiled, *sorted(agent_dir.glob("*.o"))]
    assert len(objects) > 1
    for path in objects:
        assert load_object(path) == load_object_pyelftools(path), path


def _real_elf_files(tmp_path: Path, agent_dir: Path) -> list[Path]:
    """Returns a PIE, a non-PIE executable, the C library and python of this process and
    the agent's shared library: what the program-header walk meets on a host."""
    pie = compile_c("int main(void) { return 0; }\n", tmp_path / "pie")
    exe = tmp_path / "nopie"
    (tmp_path / "nopie.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-no-pie", str(tmp_path / "nopie.c"), "-o", str(exe)], check=True)
    with open("/proc/self/maps") as f:
        libc = next(ln.split()[-1] for ln in f if "/libc.so.6" in ln)
    return [pie, exe, Path(libc), Path(sys.executable).resolve(), agent_dir / "libsandbox.so"]


def test_program_headers_equal_pyelftools(tmp_path: Path, agent_dir: Path) -> None:
    pie, exe, libc, python, agent = files = _real_elf_files(tmp_path, agent_dir)
    for path in files:
        with open(path, "rb") as f:
            phdrs = read_program_headers(f, str(path))
            assert phdrs == program_headers_pyelftools(path), path
            assert read_dynamic(f, phdrs, str(path)) == dynamic_pyelftools(path), path
            # glibc's libc.so.6 runs as a program too: it names an interpreter
            assert has_interp(phdrs) == (path != agent), path
            assert is_shared_library(f, str(path)) == (path == agent), path
    with open(exe, "rb") as f:
        assert first_load_vaddr(read_program_headers(f, str(exe))) == 0x400000
    with open(pie, "rb") as f:
        assert first_load_vaddr(read_program_headers(f, str(pie))) == 0


def test_build_id_equals_pyelftools(tmp_path: Path, agent_dir: Path) -> None:
    for path in _real_elf_files(tmp_path, agent_dir):
        with open(path, "rb") as f:
            notes = [
                n["n_desc"]
                for seg in ELFFile(f).iter_segments()
                if isinstance(seg, NoteSegment)
                for n in seg.iter_notes()
                if n["n_type"] == "NT_GNU_BUILD_ID"
            ]
        found = read_build_id(path)
        assert (found.hex() if found else None) == (notes[0] if notes else None), path


@pytest.mark.parametrize(
    "head",
    [b"hello", b"\x7fELF" + bytes([1, 1]) + bytes(58), b"\x7fELF" + bytes([2, 2]) + bytes(58)],
    ids=["not-elf", "elf32", "big-endian"],
)
def test_one_ident_check(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "f.o"
    path.write_bytes(head + bytes(200))
    for read in (load_object, read_build_id, dynamic_exports):
        with pytest.raises(ElfError, match="not an ELF64 little-endian file"):
            read(str(path))
    with open(path, "rb") as f, pytest.raises(ElfError, match="not an ELF64 little-endian"):
        read_program_headers(f, str(path))


def test_truncated_program_headers_are_an_elf_error(tmp_path: Path, agent_dir: Path) -> None:
    data = (agent_dir / "libsandbox.so").read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(data[:100])  # the ELF header and part of the program headers
    with open(cut, "rb") as f, pytest.raises(ElfError, match="program headers run past"):
        read_program_headers(f, str(cut))
