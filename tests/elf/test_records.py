"""The ELF record layouts (patchbox.elf.records) and the readers built on them agree with
pyelftools: the fast object reader against ObjectFile.load, the reference binary's bulk
symbol reader against its pyelftools path, on IFUNC and UNIQUE symbols, an extended
section index (more than 0xff00 sections) and truncated files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.sections import SymbolTableSection

from patchbox.elf.binary import Binary
from patchbox.elf.fastread import load_object
from patchbox.elf.objfile import ObjectFile
from patchbox.elf.records import SYM, sym_bind, sym_type
from patchbox.elf.reloc import RELOC_TYPES
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
    fast, ref = load_object(many), ObjectFile.load(many)
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
    assert obj.symbols == ObjectFile.load(few).symbols
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
    with pytest.raises(ElfError):
        ObjectFile.load(cut)


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
