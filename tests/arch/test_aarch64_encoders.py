"""The AArch64 instruction field encoders (patchbox.arch.aarch64): each writes its field
as capstone reads it back, and refuses a value its field cannot hold, saying why."""

from __future__ import annotations

import pytest

from patchbox.arch import aarch64 as A
from patchbox.arch import get_arch
from patchbox.errors import UnsupportedRelocation

MD = get_arch("aarch64").disasm.disassembler()
MIB = 1 << 20

# Instructions as the assembler leaves them with a zero field (aarch64-linux-gnu-as).
ADRP_X0 = 0x90000000  # adrp x0, 0
ADD_X0 = 0x91000000  # add x0, x0, #0
LDR_X0 = 0xF9400000  # ldr x0, [x0]
LDRB_W0 = 0x39400000  # ldrb w0, [x0]
LDRH_W0 = 0x79400000  # ldrh w0, [x0]
LDR_W0 = 0xB9400000  # ldr w0, [x0]
LDR_Q0 = 0x3DC00000  # ldr q0, [x0]
ADD_HI = 0x91400000  # add x0, x0, #0, lsl #12
B_COND = 0x54000000  # b.eq .
CBZ = 0xB4000000  # cbz x0, .
TBZ = 0x36000000  # tbz w0, #0, .
ADR = 0x10000000  # adr x0, .


def text(word: int, at: int = 0x400000) -> str:
    """Returns capstone's reading of ``word`` at ``at``."""
    [insn] = MD.disasm(word.to_bytes(4, "little"), at)
    return f"{insn.mnemonic} {insn.op_str}"


@pytest.mark.parametrize("delta", [0, 4, -4, 0x123454, -(128 * MIB), 128 * MIB - 4])
def test_b_and_bl(delta: int) -> None:
    at = 0x10000000
    to = at + delta
    assert text(int.from_bytes(A.b(at, to), "little"), at) == f"b #{to:#x}"
    assert text(int.from_bytes(A.bl(at, to), "little"), at) == f"bl #{to:#x}"


def test_branches_out_of_range() -> None:
    with pytest.raises(
        UnsupportedRelocation, match=r"B/BL offset: \+0x8000000 is beyond the ±128 MiB"
    ):
        A.b(0, 128 * MIB)
    with pytest.raises(UnsupportedRelocation, match=r"-0x8000004 is beyond the ±128 MiB"):
        A.bl(128 * MIB, -4)
    with pytest.raises(UnsupportedRelocation, match=r"\+0x2 is not a multiple of 4"):
        A.imm26(0x14000000, 2)
    with pytest.raises(UnsupportedRelocation, match=r"is beyond the ±1 MiB"):
        A.imm19(B_COND, MIB)
    with pytest.raises(
        UnsupportedRelocation, match=r"TBZ/TBNZ offset: \+0x8000 is beyond the ±32 KiB"
    ):
        A.imm14(TBZ, 0x8000)
    with pytest.raises(UnsupportedRelocation, match=r"ADR offset: \+0x100000 is beyond the ±1 MiB"):
        A.adr(ADR, MIB)


def test_short_branches_and_adr() -> None:
    assert text(A.imm19(B_COND, -8), 0x1000) == "b.eq #0xff8"
    assert text(A.imm19(CBZ, MIB - 4), 0) == f"cbz x0, #{MIB - 4:#x}"
    assert text(A.imm14(TBZ, 0x7FFC), 0) == "tbz w0, #0, #0x7ffc"
    assert text(A.adr(ADR, -(MIB)), MIB) == "adr x0, #0"
    assert text(A.adr(ADR, 0x12345), 0) == "adr x0, #0x12345"


@pytest.mark.parametrize("pages", [0, 1, -1, 0x12345, (1 << 20) - 1, -(1 << 20)])
def test_adrp(pages: int) -> None:
    at = 0x200000000
    assert text(A.adrp(ADRP_X0, pages << 12), at + 0x123) == f"adrp x0, #{at + (pages << 12):#x}"


def test_adrp_refuses() -> None:
    with pytest.raises(
        UnsupportedRelocation, match=r"ADRP page delta: \+0x100000000 is beyond the ±4 GiB"
    ):
        A.adrp(ADRP_X0, 1 << 32)
    with pytest.raises(
        UnsupportedRelocation, match=r"\+0x1001 is not a multiple of the 4 KiB page"
    ):
        A.adrp(ADRP_X0, 0x1001)
    # _NC: the page delta wraps at 2**33 (21 bits of pages), as the linker's does
    assert A.adrp(ADRP_X0, 1 << 33, check=False) == ADRP_X0


def test_lo12() -> None:
    assert text(A.add_lo12(ADD_X0, 0x12345FFF)) == "add x0, x0, #0xfff"
    assert text(A.add_hi12(ADD_HI, 0x123456)) == "add x0, x0, #0x123, lsl #12"
    for size, word, reg, v in (
        (1, LDRB_W0, "ldrb w0", 0x7FF),
        (2, LDRH_W0, "ldrh w0", 0xFFE),
        (4, LDR_W0, "ldr w0", 0xABC),
        (8, LDR_X0, "ldr x0", 0xFF8),
        (16, LDR_Q0, "ldr q0", 0x7F0),
    ):
        assert text(A.ldst_lo12(size)(word, 0x55000 + v)) == f"{reg}, [x0, #{v:#x}]"


def test_lo12_refuses() -> None:
    with pytest.raises(
        UnsupportedRelocation, match=r"64-bit load/store offset: \+0xffc is not a multiple of 8"
    ):
        A.ldst_lo12(8)(LDR_X0, 0x1FFC)
    with pytest.raises(
        UnsupportedRelocation, match=r"128-bit load/store offset: \+0x8 is not a multiple of 16"
    ):
        A.ldst_lo12(16)(LDR_Q0, 8)
    with pytest.raises(
        UnsupportedRelocation, match=r"thread-pointer offset: \+0x1000000 does not fit 24 bits"
    ):
        A.add_hi12(ADD_HI, 1 << 24)
    with pytest.raises(
        UnsupportedRelocation, match=r"ADD immediate: \+0x1000 does not fit 12 bits"
    ):
        A.add_lo12_checked(ADD_X0, 0x1000)


def test_apply_data_and_names_the_type() -> None:
    t = A.RELOC_TYPES
    assert A.apply(t["R_AARCH64_ABS64"], bytes(8), -1) == b"\xff" * 8
    assert A.apply(t["R_AARCH64_PREL32"], bytes(4), -8) == (-8).to_bytes(4, "little", signed=True)
    assert A.apply(t["R_AARCH64_ABS32"], bytes(4), 0xFFFFFFFF) == b"\xff" * 4
    with pytest.raises(
        UnsupportedRelocation,
        match=r"^R_AARCH64_ABS32: \+0x100000000 does not fit its 32-bit field",
    ):
        A.apply(t["R_AARCH64_ABS32"], bytes(4), 1 << 32)
    with pytest.raises(UnsupportedRelocation, match=r"^R_AARCH64_PREL32: -0x80000001 does not fit"):
        A.apply(t["R_AARCH64_PREL32"], bytes(4), -(1 << 31) - 1)
    with pytest.raises(UnsupportedRelocation, match=r"^R_AARCH64_CALL26: B/BL offset"):
        A.apply(t["R_AARCH64_CALL26"], (0x94000000).to_bytes(4, "little"), 1 << 30)


def test_value() -> None:
    t = A.RELOC_TYPES
    assert A.value(t["R_AARCH64_ADR_PREL_PG_HI21"], 0x412345, 8, 0x400FFC) == 0x12000
    assert A.value(t["R_AARCH64_ADR_GOT_PAGE"], 0, 0, 0x400000, got=0x41FFF8) == 0x1F000
    assert A.value(t["R_AARCH64_LD64_GOT_LO12_NC"], 0, 0, 0, got=0x41FFF8) == 0x41FFF8
    assert A.value(t["R_AARCH64_TLSLE_ADD_TPREL_LO12_NC"], 0, 4, 0, tp=0x10) == 0x14
    assert A.value(t["R_AARCH64_CALL26"], 0x1000, 0, 0x2000) == -0x1000
    with pytest.raises(UnsupportedRelocation, match=r"R_AARCH64_COPY: patchbox does not compute"):
        A.value(t["R_AARCH64_COPY"], 0, 0, 0)


def test_veneer_and_templates() -> None:
    words = A.veneer(0x123456789ABC)
    assert [text(int.from_bytes(words[i : i + 4], "little"), 0x1000 + i) for i in (0, 4)] == [
        "ldr x16, #0x1008",
        "br x16",
    ]
    assert int.from_bytes(words[8:], "little") == 0x123456789ABC
    assert text(A.NOP) == "nop " and text(A.BTI_C) in ("bti c", "hint #0x22")
    assert A.is_branch_field(A.bl(0, 8) + A.b(4, 0), 4)
    assert not A.is_branch_field(A.NOP.to_bytes(4, "little"), 0)
