"""The AArch64 relocation table and field encoders against the real linker: small C and
assembly files cross-compiled with ``-c`` (globals of every access size, calls, a tail
call, a call beyond ±128 MiB, a GOT reference, thread-locals local-exec, initial-exec,
through descriptors and the traditional general-dynamic), linked by
``aarch64-linux-gnu-gcc`` into a static executable and a shared library; then for every
relocation of every object the value is computed from the linked addresses with
:func:`patchbox.arch.aarch64.value` and written with :func:`~patchbox.arch.aarch64.apply`,
and must be the bytes the linker wrote. Objects are read with patchbox's own reader
(:func:`patchbox.elf.fastread.load_object`); where each input section landed comes from
the linker's map. Needs the cross toolchain (skipped, saying so, without it)."""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from helpers import cross_cc, needs_cross_cc
from patchbox.arch import Calc, get_arch
from patchbox.arch import aarch64 as A
from patchbox.elf.fastread import load_object
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.errors import UnsupportedRelocation

pytestmark = needs_cross_cc

ARCH = get_arch("aarch64")
FAR = 0x20000000  # where the far function's section goes: 500 MiB past the code

GLOBALS_C = r"""
char c8 = 1; short s16 = 2; int i32 = 3; long l64 = 4; long double q128 = 5.0L;
struct { char pad[40]; long v; } big = {{0}, 6};
int helper(int x);
int far_fn(int x);
__attribute__((noinline)) int add(int a) { return a + i32; }
long loads(void) { return c8 + s16 + i32 + l64 + big.v; }
long double loadq(void) { return q128; }
long *addr(void) { return &l64; }
int call(int x) { return add(x) * helper(x) + 1; }
int tail(int x) { return helper(x + 1); }
int call_far(int x) { return far_fn(x) + 1; }
int (*fptr)(int) = add;
__thread int t1 = 1;
__thread long t2[600];
int tls_le(void) { return t1 + (int)t2[599]; }
void entry(void) { for (;;) ; }
"""
GOT_C = "extern int i32;\nint helper(int x) { return x + i32; }\n"
FAR_C = '__attribute__((section("farcode"))) int far_fn(int x) { return x * 3; }\n'
# What the compiler does not emit for these sources: the rest of the list.
DATA_S = r"""
    .text
    .globl asm_fn
    .type asm_fn, %function
asm_fn:
    adrp x0, :pg_hi21_nc:l64
    adrp x1, q128
    ldr q0, [x1, :lo12:q128]
    add x2, x2, :tprel_lo12:t1
    b.eq near_fn
    cbz x0, near_fn
    tbz w0, #3, near_fn
    adr x1, near_fn
    ldr x2, near_lit
    ret
    .section .text.near,"ax",%progbits
    .globl near_fn
near_fn:
    ret
    .globl near_lit
    .balign 8
near_lit:
    .xword 0
    .data
    .globl words
    .balign 8
words:
    .xword l64 + 8
    .word l64
    .word l64 - .
    .xword add - .
    .hword l64 - .
"""
TLS_C = r"""
__thread int ie_v __attribute__((tls_model("initial-exec"))) = 3;
__thread int gd_v = 4;
int get_ie(void) { return ie_v; }
int get_gd(void) { return gd_v; }
"""
TRAD_C = "__thread int trad_v = 5;\nint get_trad(void) { return trad_v; }\n"

# The list: every one must have been checked against the linker's bytes.
EXPECTED = {
    "R_AARCH64_CALL26",
    "R_AARCH64_JUMP26",
    "R_AARCH64_ADR_PREL_PG_HI21",
    "R_AARCH64_ADR_PREL_PG_HI21_NC",
    "R_AARCH64_ADD_ABS_LO12_NC",
    "R_AARCH64_LDST8_ABS_LO12_NC",
    "R_AARCH64_LDST16_ABS_LO12_NC",
    "R_AARCH64_LDST32_ABS_LO12_NC",
    "R_AARCH64_LDST64_ABS_LO12_NC",
    "R_AARCH64_LDST128_ABS_LO12_NC",
    "R_AARCH64_ADR_GOT_PAGE",
    "R_AARCH64_LD64_GOT_LO12_NC",
    "R_AARCH64_PREL16",
    "R_AARCH64_PREL32",
    "R_AARCH64_PREL64",
    "R_AARCH64_ABS64",
    "R_AARCH64_ABS32",
    "R_AARCH64_CONDBR19",
    "R_AARCH64_TSTBR14",
    "R_AARCH64_ADR_PREL_LO21",
    "R_AARCH64_LD_PREL_LO19",
    "R_AARCH64_TLSLE_ADD_TPREL_HI12",
    "R_AARCH64_TLSLE_ADD_TPREL_LO12",
    "R_AARCH64_TLSLE_ADD_TPREL_LO12_NC",
    "R_AARCH64_TLSIE_ADR_GOTTPREL_PAGE21",
    "R_AARCH64_TLSIE_LD64_GOTTPREL_LO12_NC",
    "R_AARCH64_TLSDESC_ADR_PAGE21",
    "R_AARCH64_TLSDESC_LD64_LO12",
    "R_AARCH64_TLSDESC_ADD_LO12",
    "R_AARCH64_TLSGD_ADR_PAGE21",
    "R_AARCH64_TLSGD_ADD_LO12_NC",
}
# Seen, with nothing to write: TLSDESC_CALL marks the blr of a descriptor call.
MARKERS = {"R_AARCH64_TLSDESC_CALL"}

# One input section in the linker's map: name (alone on its line when long), address,
# size, object.
_MAP_LINE = re.compile(
    r"^ (\S+)\s*\n?\s+0x([0-9a-f]{16})\s+0x([0-9a-f]+)\s+(\S+\.o)$", re.MULTILINE
)


@dataclass
class Linked:
    """A linked file: where each input section went, its symbols, its bytes by address,
    its TLS segment and the GOT entries its dynamic relocations name."""

    elf: ELFFile
    placed: dict[tuple[str, str], int]  # (object, section) -> address
    symbols: dict[str, tuple[int, str]]  # name -> (value, section index or UNDEF)
    tls: tuple[int, int]  # PT_TLS (p_vaddr, p_align)
    dyn_slots: dict[tuple[str, str], int]  # (relocation type, symbol) -> GOT address

    def read(self, addr: int, n: int) -> bytes:
        for seg in self.elf.iter_segments():
            lo = seg["p_vaddr"]
            if seg["p_type"] == "PT_LOAD" and lo <= addr and addr + n <= lo + seg["p_filesz"]:
                return seg.data()[addr - lo : addr - lo + n]
        raise AssertionError(f"{addr:#x} is in no loaded segment")

    def got_holding(self, value: int) -> int:
        got = self.elf.get_section_by_name(".got")
        assert got is not None
        data, base = got.data(), got["sh_addr"]
        at = [
            base + o
            for o in range(0, len(data), 8)
            if data[o : o + 8] == value.to_bytes(8, "little")
        ]
        assert len(at) == 1, (hex(value), at)
        return at[0]


def link(tmp_path: Path, out: str, objects: list[str], *flags: str) -> Linked:
    cross_cc("-nostdlib", *flags, f"-Wl,-Map={out}.map", *objects, "-o", out, cwd=tmp_path)
    elf = ELFFile(io.BytesIO((tmp_path / out).read_bytes()))
    placed = {
        (m[4], m[1]): int(m[2], 16)
        for m in _MAP_LINE.finditer((tmp_path / f"{out}.map").read_text())
    }
    symtab = elf.get_section_by_name(".symtab")
    assert isinstance(symtab, SymbolTableSection)
    symbols = {s.name: (s["st_value"], str(s["st_shndx"])) for s in symtab.iter_symbols()}
    tls = next(
        ((s["p_vaddr"], s["p_align"]) for s in elf.iter_segments() if s["p_type"] == "PT_TLS"),
        (0, 1),
    )
    dyn_slots = {}
    for sec in elf.iter_sections():
        if isinstance(sec, RelocationSection) and sec["sh_flags"] & 2:  # SHF_ALLOC
            dynsym = elf.get_section(sec["sh_link"])
            assert isinstance(dynsym, SymbolTableSection)
            for r in sec.iter_relocations():
                name = ARCH.relocs.name(r["r_info_type"])
                sym = dynsym.get_symbol(r["r_info_sym"]).name if r["r_info_sym"] else ""
                dyn_slots[(name, sym)] = r["r_offset"]
    return Linked(elf, placed, symbols, tls, dyn_slots)


def _address(obj: ObjectFile, name: str, sym: ObjSymbol, linked: Linked) -> int:
    """Returns the linked address of ``sym`` of object ``name``."""
    if sym.defined:
        sec = obj.get_symbol_section(sym)
        return linked.placed[(name, sec.name)] + sym.value
    value, shndx = linked.symbols[sym.name]
    assert shndx != "SHN_UNDEF", sym.name
    return value


def _value(obj: ObjectFile, name: str, sec: Section, rel: Relocation, linked: Linked) -> int:
    """Returns the value of ``rel`` (in ``sec`` of object ``name``) from linked addresses."""
    rtype = ARCH.relocs.get(rel.type)
    assert rtype is not None
    p = linked.placed[(name, sec.name)] + rel.offset
    s = _address(obj, name, rel.symbol, linked)
    sym = rel.symbol.name or obj.get_symbol_section(rel.symbol).name
    got = tp = 0
    calc = rtype.calc
    if calc in (Calc.GOT_PAGE, Calc.GOT_LO12):
        got = linked.got_holding(s + rel.addend)
    elif calc in (Calc.TLS_GOT_PAGE, Calc.TLS_GOT_LO12):
        got = linked.dyn_slots[("R_AARCH64_TLS_TPREL", sym)]
    elif calc in (Calc.TLSDESC_PAGE, Calc.TLSDESC_LO12):
        got = linked.dyn_slots[("R_AARCH64_TLSDESC", sym)]
    elif calc in (Calc.TLSGD_PAGE, Calc.TLSGD_LO12):
        got = linked.dyn_slots[("R_AARCH64_TLS_DTPMOD", sym)]
    elif calc is Calc.TPREL:
        # A TLS symbol of the linked file holds its offset in the TLS segment already.
        start, align = linked.tls
        offset = s - start if rel.symbol.defined else s
        tp = -(-ARCH.tls.tcb_size // align) * align + offset
    return A.value(rtype, s, rel.addend, p, got=got, tp=tp)


def _check(objects: dict[str, ObjectFile], linked: Linked, seen: Counter[str]) -> list[str]:
    """Checks every relocation of ``objects`` against ``linked``; returns those that
    differ, counts the ones that agree in ``seen``."""
    wrong = []
    for name, obj in objects.items():
        for sec in obj.sections:
            # .eh_frame: the linker edits it (merges CIEs), so fields move.
            if not sec.is_alloc or sec.name == ".eh_frame" or not obj.get_relocations(sec):
                continue
            for rel in obj.get_relocations(sec):
                rtype = ARCH.relocs.get(rel.type)
                assert rtype is not None, rel.type
                if rtype.name in MARKERS:
                    seen[rtype.name] += 1
                    continue
                if (
                    not rel.symbol.defined
                    and linked.symbols.get(rel.symbol.name, (0, "SHN_UNDEF"))[1] == "SHN_UNDEF"
                ):
                    continue  # an import of the library (__tls_get_addr): through the PLT
                if rel.symbol.name == "far_fn":
                    continue  # test_far_call_needs_a_veneer
                p = linked.placed[(name, sec.name)] + rel.offset
                old = sec.data[rel.offset : rel.offset + rtype.size]
                mine = A.apply(rtype, old, _value(obj, name, sec, rel, linked))
                theirs = linked.read(p, rtype.size)
                if mine != theirs:
                    wrong.append(
                        f"{name} {sec.name}+{rel.offset:#x} {rtype.name} {rel.symbol.name}: {mine.hex()} != {theirs.hex()}"
                    )
                else:
                    seen[rtype.name] += 1
    return wrong


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, ObjectFile], Linked, Linked]:
    d = tmp_path_factory.mktemp("a64")
    for name, text in {
        "globals.c": GLOBALS_C,
        "got.c": GOT_C,
        "far.c": FAR_C,
        "data.s": DATA_S,
        "tls.c": TLS_C,
        "trad.c": TRAD_C,
    }.items():
        (d / name).write_text(text)
    common = ("-O2", "-ffunction-sections", "-fdata-sections", "-c")
    cross_cc(*common, "-fno-pic", "-ftls-model=local-exec", "globals.c", "far.c", "data.s", cwd=d)
    cross_cc(*common, "-fPIC", "got.c", "tls.c", cwd=d)
    cross_cc(*common, "-fPIC", "-mtls-dialect=trad", "trad.c", cwd=d)
    exe_objs = ["globals.o", "got.o", "far.o", "data.o"]
    exe = link(
        d,
        "exe",
        exe_objs,
        "-static",
        "-no-pie",
        "-Wl,-e,entry",
        f"-Wl,--section-start=farcode={FAR:#x}",
    )
    lib = link(d, "lib.so", ["tls.o", "trad.o"], "-shared")
    objects = {n: load_object(d / n) for n in [*exe_objs, "tls.o", "trad.o"]}
    return d, objects, exe, lib


def test_every_relocation_as_the_linker_writes_it(
    built: tuple[Path, dict[str, ObjectFile], Linked, Linked],
) -> None:
    _d, objects, exe, lib = built
    assert {o.arch.name for o in objects.values()} == {"aarch64"}
    seen: Counter[str] = Counter()
    wrong = _check({k: v for k, v in objects.items() if k not in ("tls.o", "trad.o")}, exe, seen)
    wrong += _check({k: objects[k] for k in ("tls.o", "trad.o")}, lib, seen)
    assert not wrong, "\n".join(wrong)
    assert set(seen) >= EXPECTED | MARKERS, sorted(EXPECTED | MARKERS - set(seen))
    assert sum(seen.values()) >= 45, seen  # 48 with gcc 12, binutils 2.40


def test_far_call_needs_a_veneer(built: tuple[Path, dict[str, ObjectFile], Linked, Linked]) -> None:
    """A call beyond ±128 MiB: the encoder refuses it, naming the reach; the linker sent
    it to a veneer of its own, which is where patchbox's B/BL would have to go too."""
    _d, objects, exe, _lib = built
    obj = objects["globals.o"]
    sec = next(s for s in obj.sections if s.name == ".text.call_far")
    [rel] = [r for r in obj.get_relocations(sec) if r.symbol.name == "far_fn"]
    rtype = ARCH.relocs.get(rel.type)
    assert rtype is not None and rtype.name == "R_AARCH64_CALL26"
    p = exe.placed[("globals.o", sec.name)] + rel.offset
    v = _value(obj, "globals.o", sec, rel, exe)
    assert v > 128 << 20
    with pytest.raises(
        UnsupportedRelocation,
        match=r"^R_AARCH64_CALL26: B/BL offset: \+0x1[0-9a-f]+ is beyond the ±128 MiB",
    ):
        A.apply(rtype, sec.data[rel.offset : rel.offset + 4], v)
    word = int.from_bytes(exe.read(p, 4), "little")
    imm = word & 0x3FFFFFF
    to = p + ((imm - (1 << 26) if imm >> 25 else imm) << 2)
    veneers = {v for n, (v, _s) in exe.symbols.items() if n.endswith("_veneer")}
    assert to in veneers
    assert A.apply(rtype, sec.data[rel.offset : rel.offset + 4], to - p) == exe.read(p, 4)
