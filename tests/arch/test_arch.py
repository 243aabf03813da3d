"""The architecture descriptions (patchbox.arch): lookups, and each table against a source
that is not ours: relocation numbers against glibc's <elf.h>, system call numbers against
the kernel's headers, each entry and jump against the agent's arch headers, the
register layouts against the C structs (compiled for each architecture when a compiler
for it is here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from patchbox.arch import (
    Arch,
    Recipe,
    get_arch,
    get_arch_by_machine,
    host_arch,
    iter_arches,
    unnamed_arch,
)
from patchbox.arch.x86_64 import ENDBR64
from patchbox.errors import ElfError, UnsupportedRelocation
from patchbox.wire import FixupType

X86 = get_arch("x86_64")
A64 = get_arch("aarch64")
ELF_H = Path("/usr/include/elf.h")
CROSS = "aarch64-linux-gnu-gcc"


def test_lookups() -> None:
    assert get_arch("amd64") is X86 and get_arch("arm64") is A64
    assert get_arch_by_machine(62) is X86 and get_arch_by_machine("EM_AARCH64") is A64
    assert host_arch() in iter_arches() and unnamed_arch() is X86
    with pytest.raises(ElfError, match=r"unknown architecture 'riscv64' \(patchbox knows"):
        get_arch("riscv64")
    with pytest.raises(ElfError, match=r"^a\.o: an ELF file for machine EM_ARM: patchbox knows"):
        get_arch_by_machine("EM_ARM", "a.o")


AGENT_ARCH = Path(__file__).resolve().parents[2] / "agent" / "src" / "arch"


@pytest.mark.parametrize("arch", iter_arches(), ids=lambda a: a.name)
def test_entry_agrees_with_the_agent(arch: Arch) -> None:
    """The agent's arch/<name>/insn.h writes what the Python side reads: the entry's
    padding, the landing pad, the entry jump's length and the ELF machine."""
    text = (AGENT_ARCH / arch.name / "insn.h").read_text()
    defs = dict(re.findall(r"^#define (SANDBOX_ARCH_\w+)\s+(\S+)", text, re.M))
    e = arch.entry
    assert (e.pad, e.at, e.skip, arch.branches.jump_len, arch.e_machine) == tuple(
        int(defs[f"SANDBOX_ARCH_{n}"])
        for n in ("ENTRY_PAD", "ENTRY_NOPS", "LANDING_LEN", "JUMP_LEN", "MACHINE")
    )
    assert defs["SANDBOX_ARCH_NAME"] == f'"{arch.name}"'
    assert e.flag in text


def test_x86_64_entry() -> None:
    e = X86.entry
    assert e.flag == "-fpatchable-function-entry=8,6" and e.landing == ENDBR64
    assert X86.branches.jump(0x1000, 0x2000) == bytes.fromhex("e9fb0f0000")
    assert X86.branches.call(0x2000, 0x1000) == bytes.fromhex("e8fbefffff")
    with pytest.raises(UnsupportedRelocation, match=r"beyond rel32's ±2 GiB"):
        X86.branches.jump(0, (1 << 31) + 5)


def test_aarch64_entry() -> None:
    e = A64.entry
    assert e.flag == "-fpatchable-function-entry=5,4"
    assert (e.pad, e.at, e.skip, e.publish, A64.branches.jump_len) == (16, 4, 4, 4, 4)
    assert e.nops == bytes.fromhex("1f2003d5") * 5
    assert e.landing == bytes.fromhex("5f2403d5")  # bti c


@pytest.mark.skipif(not ELF_H.is_file(), reason="no /usr/include/elf.h (libc6-dev)")
@pytest.mark.parametrize("arch", iter_arches(), ids=lambda a: a.name)
def test_relocation_numbers_match_elf_h(arch: Arch) -> None:
    defs = dict(
        (m[0], int(m[1]))
        for m in re.findall(r"#define\s+(R_\w+)\s+(\d+)", ELF_H.read_text())
        if m[0].startswith(arch.relocs.prefix)
    )
    checked = [t.name for t in arch.relocs if t.name in defs]
    assert len(checked) >= 30, checked
    for name in checked:
        assert arch.relocs[name].number == defs[name], name
    for t in arch.relocs:
        assert arch.relocs.name(t.number) == t.name
        assert arch.relocs.get(t.number) is t
    assert arch.relocs.name(9999) == f"{arch.relocs.prefix}<9999>"


def test_pc_relative_properties() -> None:
    pc = {t.name for t in A64.relocs if t.pcrel}
    assert {
        "R_AARCH64_CALL26",
        "R_AARCH64_JUMP26",
        "R_AARCH64_ADR_PREL_PG_HI21",
        "R_AARCH64_ADR_GOT_PAGE",
        "R_AARCH64_PREL32",
        "R_AARCH64_PREL64",
        "R_AARCH64_TLSIE_ADR_GOTTPREL_PAGE21",
        "R_AARCH64_TLSDESC_ADR_PAGE21",
    } <= pc
    assert not pc & {
        "R_AARCH64_ABS64",
        "R_AARCH64_ADD_ABS_LO12_NC",
        "R_AARCH64_LD64_GOT_LO12_NC",
        "R_AARCH64_TLSLE_ADD_TPREL_HI12",
    }
    # The types a live patch carries, each with the fix-up type that writes its field;
    # the others are refused by name.
    carried = {
        t.name: t.field_fixup.name for t in A64.relocs if t.recipe not in (None, Recipe.NONE)
    }
    assert carried == {
        "R_AARCH64_ABS64": "ABS64",
        "R_AARCH64_PREL32": "PC32",
        "R_AARCH64_ADR_PREL_PG_HI21": "ADR_PAGE",
        "R_AARCH64_ADR_PREL_PG_HI21_NC": "ADR_PAGE",
        "R_AARCH64_ADD_ABS_LO12_NC": "ADD_LO12",
        "R_AARCH64_LDST8_ABS_LO12_NC": "LDST8_LO12",
        "R_AARCH64_LDST16_ABS_LO12_NC": "LDST16_LO12",
        "R_AARCH64_LDST32_ABS_LO12_NC": "LDST32_LO12",
        "R_AARCH64_LDST64_ABS_LO12_NC": "LDST64_LO12",
        "R_AARCH64_LDST128_ABS_LO12_NC": "LDST128_LO12",
        "R_AARCH64_JUMP26": "BRANCH26",
        "R_AARCH64_CALL26": "BRANCH26",
        "R_AARCH64_ADR_GOT_PAGE": "ADR_PAGE",
        "R_AARCH64_LD64_GOT_LO12_NC": "LDST64_LO12",
        # Thread-local: initial-exec through a slot; local-exec's constant is written by
        # the extractor (no fix-up: the field's type is never sent).
        "R_AARCH64_TLSIE_ADR_GOTTPREL_PAGE21": "ADR_PAGE",
        "R_AARCH64_TLSIE_LD64_GOTTPREL_LO12_NC": "LDST64_LO12",
        # General-dynamic: the binary's own GOT pair, or its own descriptor.
        "R_AARCH64_TLSGD_ADR_PAGE21": "ADR_PAGE",
        "R_AARCH64_TLSGD_ADD_LO12_NC": "ADD_LO12",
        "R_AARCH64_TLSDESC_ADR_PAGE21": "ADR_PAGE",
        "R_AARCH64_TLSDESC_LD64_LO12": "LDST64_LO12",
        "R_AARCH64_TLSDESC_ADD_LO12": "ADD_LO12",
        "R_AARCH64_TLSLE_ADD_TPREL_HI12": "PC32",
        "R_AARCH64_TLSLE_ADD_TPREL_LO12": "PC32",
        "R_AARCH64_TLSLE_ADD_TPREL_LO12_NC": "PC32",
    }
    assert A64.relocs.get_carried(283, ".text.f+0x8", "g").recipe is Recipe.CALL
    with pytest.raises(
        UnsupportedRelocation,
        match=r"^unsupported relocation R_AARCH64_CONDBR19 in \.text\.f\+0x8 against 'g' "
        r"\(the patch format has no aarch64 fix-up for this field",
    ):
        A64.relocs.get_carried(280, ".text.f+0x8", "g")
    assert X86.fixup_types == {FixupType.PC32, FixupType.ABS64}
    assert X86.relocs.get_carried(2, ".text.f+0x1", "g").recipe is Recipe.PCREL


def _syscalls(header: Path, prefix: str) -> dict[str, int]:
    return {
        m[0]: int(m[1])
        for m in re.findall(rf"#define\s+{prefix}(\w+)\s+(\d+)\b", header.read_text())
    }


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/aarch64-linux-gnu/include/asm-generic/unistd.h"),
    ],
)
def test_syscall_numbers_match_the_kernel_headers(name: str, header: str) -> None:
    if not Path(header).is_file():
        pytest.skip(f"no {header} (linux-libc-dev for {name}: scripts/bootstrap.sh)")
    known = _syscalls(Path(header), "__NR_" if name == "x86_64" else "__NR3?2?_")
    for call, nr in get_arch(name).syscalls.items():
        assert known.get(call) == nr, (name, call)


@pytest.mark.parametrize(
    ("name", "cc", "struct"),
    [("x86_64", "gcc", "struct user_regs_struct"), ("aarch64", CROSS, "struct user_pt_regs")],
)
def test_register_layout_matches_the_c_struct(
    tmp_path: Path, name: str, cc: str, struct: str
) -> None:
    """Every register at 8 times its index: the offsets the C compiler gives (read from
    the assembly, so no program of the other architecture has to run)."""
    if shutil.which(cc) is None:
        pytest.skip(f"no {cc} (scripts/bootstrap.sh installs gcc and gcc-aarch64-linux-gnu)")
    regs = get_arch(name).registers
    fields = [f"regs[{r[1:]}]" if name == "aarch64" and r[0] == "x" else r for r in regs.names]
    header = "sys/user.h" if name == "x86_64" else "asm/ptrace.h"
    src = "\n".join(
        [f"#include <stddef.h>\n#include <{header}>"]
        # + 1: a zero would go to .bss, not into the assembly as a number
        + [f"long off_{i} = offsetof({struct}, {f}) + 1;" for i, f in enumerate(fields)]
        + [f"long size = sizeof({struct});"]
    )
    (tmp_path / "r.c").write_text(src)
    asm = subprocess.run(
        [cc, "-S", "-o", "-", str(tmp_path / "r.c")], capture_output=True, text=True, check=True
    ).stdout
    *offsets, size = [int(v) for v in re.findall(r"\.(?:quad|xword|8byte)\s+(\d+)", asm)]
    assert offsets == [8 * i + 1 for i in range(len(fields))]
    assert size == 8 * len(fields)
    assert {regs.pc, regs.sp, regs.ret, regs.syscall_nr, regs.flags} <= set(regs.names)
