"""The ELF readers on AArch64 files (issue 22): the fast object reader reads a
cross-compiled object as pyelftools does and says it is for aarch64; the reference binary
opens a cross-linked executable with its architecture from ``e_machine``; an ELF file of
a machine patchbox does not know is refused by name. Needs the cross compiler."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from elf_reference import load_object_pyelftools
from helpers import cross_cc, needs_cross_cc
from patchbox.arch import get_arch
from patchbox.elf.binary import Binary
from patchbox.elf.fastread import load_object
from patchbox.errors import ElfError

SRC = r"""
static int counter;
const char *greeting = "hello";
__thread int per_thread;
__attribute__((noinline)) int bump(int by) { counter += by; per_thread++; return counter; }
int entry(void) { return bump(1) + (greeting[0] == 'h'); }
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("a64elf")
    (d / "prog.c").write_text(SRC)
    flags = [
        "-O2",
        "-g",
        "-ffunction-sections",
        "-fdata-sections",
        "-fpatchable-function-entry=5,4",
    ]
    cross_cc(*flags, "-c", "prog.c", cwd=d)
    cross_cc("-nostdlib", "-static", "-Wl,-e,entry", "prog.o", "-o", "prog", cwd=d)
    return d


@needs_cross_cc
def test_fast_reader_on_an_aarch64_object(built: Path) -> None:
    fast, ref = load_object(built / "prog.o"), load_object_pyelftools(built / "prog.o")
    assert fast.arch is get_arch("aarch64") and ref.arch is fast.arch
    assert fast.sections == ref.sections
    assert fast.symbols == ref.symbols
    assert fast.relocations == ref.relocations
    bump = fast.get_function("bump")
    assert bump is not None and bump.value == fast.arch.entry.pad  # 4 NOPs before it
    sec = fast.get_symbol_section(bump)
    assert sec.data[: len(fast.arch.entry.nops)] == fast.arch.entry.nops
    names = {fast.arch.relocs.name(r.type) for rels in fast.relocations.values() for r in rels}
    assert {"R_AARCH64_CALL26", "R_AARCH64_ADR_PREL_PG_HI21"} <= names


@needs_cross_cc
def test_reference_binary_of_aarch64(built: Path) -> None:
    with Binary(built / "prog") as b:
        assert b.arch is get_arch("aarch64")
        bump = b.find_symbol("bump")
        assert bump is not None and bump.type == "FUNC"
        assert b.read(bump.address - 16, 20) == b.arch.entry.nops


def test_unknown_machine_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.c").write_text("int x;\n")
    subprocess.run(["gcc", "-c", "x.c"], cwd=tmp_path, check=True)
    raw = bytearray((tmp_path / "x.o").read_bytes())
    raw[18:20] = (40).to_bytes(2, "little")  # e_machine = EM_ARM
    (tmp_path / "arm.o").write_bytes(raw)
    with pytest.raises(
        ElfError, match=r"arm\.o: an ELF file for machine EM_ARM: patchbox knows x86-64, AArch64"
    ):
        load_object(tmp_path / "arm.o")
