"""patchbox.elf: the reference binary, relocatable objects and the relocation table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import compile_c
from patchbox.arch import Recipe, get_arch
from patchbox.elf.binary import Binary, strip_version
from patchbox.elf.fastread import load_object
from patchbox.errors import ElfError, ExtractError, UnsupportedRelocation

SRC = r"""
#include <stdio.h>
int shared = 3;
static int hidden = 4;
__attribute__((noipa)) int twice(int x) { return 2 * x + hidden++; }
int main(void) { printf("%d\n", twice(shared)); return 0; }
"""


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(SRC, tmp_path_factory.mktemp("elf") / "prog")


def test_build_id_matches_readelf(exe: Path) -> None:
    out = subprocess.run(
        ["readelf", "-n", str(exe)], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert m is not None, out
    want = m[1]
    with Binary(exe) as b:
        assert b.build_id().hex() == want
        assert b.is_pie


def test_symbols_and_bytes(exe: Path) -> None:
    with Binary(exe) as b:
        twice = b.get_symbol("twice")
        assert (twice.type, twice.bind, twice.source_file) == ("FUNC", "GLOBAL", None)
        assert b.read(twice.address - 6, 8) == b"\x90" * 8
        hidden = b.get_symbol("hidden", "some/dir/prog.c")
        assert (hidden.type, hidden.bind, hidden.source_file) == ("OBJECT", "LOCAL", "prog.c")
        assert b.read(b.get_symbol("shared").address, 4) == (3).to_bytes(4, "little")
        assert b.find_symbol("hidden", "other.c") is None
        with pytest.raises(ExtractError, match="only in prog.c"):
            b.get_symbol("hidden", "other.c")
        assert b.find_symbol("printf") is None  # undefined here: a library's
        assert any(s.name == "printf" and not s.defined for s in b.iter_symbols())
        with pytest.raises(ElfError, match="not inside one loadable segment"):
            b.read(0x7FFF_0000_0000, 4)


def test_binary_without_build_id(tmp_path: Path) -> None:
    c = tmp_path / "n.c"
    c.write_text("int main(void) { return 0; }\n")
    out = tmp_path / "n"
    subprocess.run(["gcc", "-Wl,--build-id=none", str(c), "-o", str(out)], check=True)
    with Binary(out) as b, pytest.raises(ElfError, match="no GNU build-id"):
        b.build_id()


def test_object_file(tmp_path: Path) -> None:
    obj = load_object(compile_c(SRC, tmp_path / "prog.o", obj=True))
    assert obj.source_file == "prog.c"
    fn = obj.get_function("twice")
    assert fn is not None and fn.value == 6
    sec = obj.get_section(fn.shndx)
    assert sec.name == ".text.twice" and sec.is_exec and sec.data[:8] == b"\x90" * 8
    assert {r.symbol.name for r in obj.get_relocations(sec)} == {".data.hidden"}


def test_reloc_table() -> None:
    relocs = get_arch("x86_64").relocs
    assert relocs.get_carried(4, ".text.f+0x1", "g").recipe is Recipe.CALL
    assert relocs.get_carried(42, ".text.f+0x1", "g").recipe is Recipe.GOT
    assert relocs.name(41) == "R_X86_64_GOTPCRELX"
    with pytest.raises(
        UnsupportedRelocation,
        match=r"^unsupported relocation R_X86_64_32S in \.text\.f\+0x12 against 'x'",
    ):
        relocs.get_carried(11, ".text.f+0x12", "x")
    assert strip_version("stdout@GLIBC_2.2.5") == "stdout" and strip_version("f@@V1") == "f"
