"""extract-patch on aarch64 objects, without running anything (the unit tier's half of
tests/e2e/test_aarch64_extract.py): each relocation of a cross-compiled fix becomes the
fix-up type and base of its recipe (docs/patch-format.md, "How extract-patch fills it
(aarch64)"), aimed at the running program's functions and variables, a GOT slot or an
import stub the patch carries; thread-local accesses of an executable get their TP
offsets; what has no recipe is refused by name. Needs the
cross compiler (skipped, saying so, without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CROSS_CC, cross_cc, elf_symbol, needs_cross_cc
from patchbox.arch import Machine, get_arch
from patchbox.errors import UnsupportedRelocation
from patchbox.extract import extract_patch
from patchbox.flags import patch_cflags
from patchbox.format.model import Fixup
from patchbox.wire import FixupBase, FixupSection, FixupType, RedirectKind

pytestmark = needs_cross_cc

A64 = get_arch("aarch64")
CFLAGS = ["-O2", "-fPIE", *patch_cflags(A64)]

SVC = r"""
#include <stdio.h>
extern int limit;
static int calls;
__attribute__((noinline)) int scale(int x) { __asm__ volatile(""); return x * 2; }
__attribute__((noinline)) int render(char *buf, unsigned long len, int n)
{
	calls++;
	return snprintf(buf, len, "%s %d %d %d", "v1", scale(n), calls, limit);
}
"""
MAIN = r"""
int limit = 7;
int render(char *buf, unsigned long len, int n);
int main(void) { char b[64]; return render(b, sizeof b, 1); }
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Returns (the linked program, the fixed object)."""
    d = tmp_path_factory.mktemp("a64recipes")
    (d / "old").mkdir()
    (d / "new").mkdir()
    (d / "old" / "svc.c").write_text(SVC)
    (d / "new" / "svc.c").write_text(SVC.replace('"v1"', '"v2"'))
    (d / "main.c").write_text(MAIN)
    for sub in ("old", "new"):
        cross_cc(*CFLAGS, "-c", "svc.c", "-o", "svc.o", cwd=d / sub)
    cross_cc(*CFLAGS, "-pie", "main.c", "old/svc.o", "-Wl,--build-id=sha1", "-o", "prog", cwd=d)
    return d / "prog", d / "new" / "svc.o"


def _at(fixups: list[Fixup], text: bytes, word: int, mask: int) -> list[Fixup]:
    """Returns the text fix-ups written into instructions ``word`` (under ``mask``)."""
    return [
        fx
        for fx in fixups
        if fx.section == FixupSection.TEXT
        and int.from_bytes(text[fx.offset : fx.offset + 4], "little") & mask == word
    ]


def test_every_reference_gets_its_recipe(built: tuple[Path, Path]) -> None:
    exe, fixed = built
    patch = extract_patch(fixed, exe, ["render"])
    assert patch.machine == Machine.AARCH64
    fn = patch.functions[0]
    assert (fn.kind, fn.skip, fn.target) == (
        RedirectKind.PATCHABLE_ENTRY,
        0,
        elf_symbol(exe, "render")["st_value"],
    )
    kinds = {(fx.type, fx.base) for fx in patch.fixups}
    assert kinds == {
        (FixupType.BRANCH26, FixupBase.EXE),  # scale: the program's
        (FixupType.BRANCH26, FixupBase.TEXT),  # snprintf: through the stub
        (FixupType.ABS64, FixupBase.IMPORT),  # the stub's literal
        (FixupType.ADR_PAGE, FixupBase.EXE),  # calls: the program's static
        (FixupType.LDST32_LO12, FixupBase.EXE),
        (FixupType.ADR_PAGE, FixupBase.TEXT),  # the GOT slot, the string literals
        (FixupType.LDST64_LO12, FixupBase.TEXT),  # the GOT slot
        (FixupType.ADD_LO12, FixupBase.TEXT),  # the string literals, copied
        (FixupType.ABS64, FixupBase.EXE),  # the GOT slot's content: limit
    }, kinds
    calls = elf_symbol(exe, "calls")["st_value"]
    scale = elf_symbol(exe, "scale")["st_value"]
    limit = elf_symbol(exe, "limit")["st_value"]
    by = {(fx.type, fx.base): fx for fx in patch.fixups}
    assert by[FixupType.BRANCH26, FixupBase.EXE].addend == scale
    assert {fx.addend for fx in patch.fixups if fx.base == FixupBase.EXE} == {scale, calls, limit}
    # The instruction classes the agent checks, the field left zero (a B or a BL: the
    # call of snprintf is a tail call).
    assert _at(patch.fixups, patch.text, 0x14000000, 0x7FFFFFFF) == [
        fx for fx in patch.fixups if fx.type == FixupType.BRANCH26
    ]
    for fx in patch.fixups:
        if fx.type == FixupType.ADR_PAGE:
            assert _at([fx], patch.text, 0x90000000, 0x9FFFFFE0), fx
    # The stub (ldr x16, #8; br x16; literal) and the GOT slot: 8-aligned literals.
    stub = by[FixupType.BRANCH26, FixupBase.TEXT].addend
    assert patch.text[stub : stub + 8] == A64.branches.stub
    imp = by[FixupType.ABS64, FixupBase.IMPORT]
    assert (imp.offset, imp.symbol) == (stub + 8, "snprintf")
    slot = by[FixupType.ABS64, FixupBase.EXE]
    assert slot.offset % 8 == 0 and slot.addend == limit
    assert by[FixupType.LDST64_LO12, FixupBase.TEXT].addend == slot.offset


PICK = r"""
typedef int (*op)(int);
__attribute__((noinline)) static int twice(int x) { __asm__ volatile(""); return x * 2; }
__attribute__((noinline)) static int thrice(int x) { __asm__ volatile(""); return x * 3; }
__attribute__((noinline)) op pick(int n) { return n ? twice : thrice; }
"""
PICK_MAIN = (
    "typedef int (*op)(int);\nop pick(int n);\nint main(int c, char **v) { return pick(c)(c); }\n"
)


def test_static_functions_by_address_are_the_programs(tmp_path: Path) -> None:
    """The address of a static function (ADRP + ADD against its section: every code
    section of an aarch64 object also holds a ``$x`` mapping symbol, three in this file)
    is the program's function, as memcached's proxy_process_command takes them: the
    mapping symbols name no place of the program and are passed over, not looked up
    (they were: "static '$x' of s.c is ambiguous")."""
    for sub, src in (
        ("old", PICK),
        ("new", PICK.replace("n ? twice : thrice", "n ? thrice : twice")),
    ):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "s.c").write_text(src)
        cross_cc(*CFLAGS, "-g", "-c", "s.c", "-o", "s.o", cwd=tmp_path / sub)
    (tmp_path / "m.c").write_text(PICK_MAIN)
    cross_cc(*CFLAGS, "-pie", "m.c", "old/s.o", "-Wl,--build-id=sha1", "-o", "p", cwd=tmp_path)
    patch = extract_patch(tmp_path / "new" / "s.o", tmp_path / "p", ["pick"])
    twice, thrice = (elf_symbol(tmp_path / "p", n)["st_value"] for n in ("twice", "thrice"))
    got = sorted((fx.type, fx.base, fx.addend) for fx in patch.fixups)
    assert got == sorted(
        (t, FixupBase.EXE, a)
        for t in (FixupType.ADR_PAGE, FixupType.ADD_LO12)
        for a in (twice, thrice)
    ), got


TLS = r"""
static __thread int mine;
extern __thread int theirs;
__attribute__((noinline)) int f(void) { mine += 3; theirs += 1; return mine * 100 + theirs; }
"""
TLS_MAIN = "__thread int theirs;\nint f(void);\nint main(void) { return f(); }\n"


def test_thread_local_in_an_executable(tmp_path: Path) -> None:
    """Local-exec: the TP offset (variant I: after the 16-byte TCB) into the two ADDs;
    initial-exec: a slot of the patch holding it, reached by ADRP + LDR."""
    (tmp_path / "t.c").write_text(TLS)
    (tmp_path / "m.c").write_text(TLS_MAIN)
    cross_cc(*CFLAGS, "-c", "t.c", "-o", "t.o", cwd=tmp_path)
    cross_cc(*CFLAGS, "-pie", "m.c", "t.o", "-Wl,--build-id=sha1", "-o", "t", cwd=tmp_path)
    patch = extract_patch(tmp_path / "t.o", tmp_path / "t", ["f"])
    assert patch.meta["tls:mine"].startswith("local-exec: TP offset ")
    assert patch.meta["tls:theirs"].startswith("initial-exec: TP offset ")
    tp = int(patch.meta["tls:mine"].split()[-1])
    assert tp >= 16  # after the thread control block
    hi, lo = 0x91400000, 0x91000000  # add xd, xn, #imm, lsl #12; add xd, xn, #imm
    words = [int.from_bytes(patch.text[o : o + 4], "little") for o in range(0, len(patch.text), 4)]
    assert any(w & 0xFFC00000 == hi and (w >> 10) & 0xFFF == tp >> 12 for w in words)
    assert any(w & 0xFFC00000 == lo and (w >> 10) & 0xFFF == tp & 0xFFF for w in words)
    slot = next(fx for fx in patch.fixups if fx.base == FixupBase.ABS)
    assert slot.type == FixupType.ABS64 and slot.offset % 8 == 0
    assert slot.addend == int(patch.meta["tls:theirs"].split()[3])
    assert {fx.type for fx in patch.fixups if fx.addend == slot.offset} == {
        FixupType.ADR_PAGE,
        FixupType.LDST64_LO12,
    }


def test_thread_local_through_a_descriptor_refused(tmp_path: Path) -> None:
    """A fix of an executable compiled as for a library (-fPIC: TLS descriptors): the
    executable has no descriptor of its own for the variable (ld relaxed its accesses),
    so the access is refused naming the variable, the relocation and the way out."""
    (tmp_path / "t.c").write_text(TLS)
    (tmp_path / "m.c").write_text(TLS_MAIN)
    cross_cc(*CFLAGS, "-c", "t.c", "-o", "pie.o", cwd=tmp_path)
    cross_cc(*CFLAGS, "-pie", "m.c", "pie.o", "-Wl,--build-id=sha1", "-o", "t", cwd=tmp_path)
    cross_cc("-O2", "-fPIC", *patch_cflags(A64), "-c", "t.c", "-o", "pic.o", cwd=tmp_path)
    with pytest.raises(
        UnsupportedRelocation,
        match=r"'mine' \(general-dynamic through a descriptor .* \.text\.f\+0x\w+, "
        r"R_AARCH64_TLSDESC_\w+\): .* has no descriptor \(R_AARCH64_TLSDESC\) for it.*-fPIE",
    ):
        extract_patch(tmp_path / "pic.o", tmp_path / "t", ["f"])


def test_cross_compiler_named() -> None:
    assert f"{A64.multiarch}-gcc" == CROSS_CC


STATICS = r"""
static int calls;
__attribute__((noinline)) static int scale(int x) { __asm__ volatile(""); return x * 10 + calls; }
__attribute__((noinline)) static int other(int x) { __asm__ volatile(""); return x - calls; }
__attribute__((noinline)) int use(int x) { calls++; return scale(x) + @K@; }
__attribute__((noinline)) int more(int x) { return other(x) * 2; }
int main(void) { return use(1) + more(2); }
"""


def test_static_helper_without_debug_info(tmp_path: Path) -> None:
    """A call to a static function of the file, built without -g: the helper's section
    is found in the program through its own symbol, not through the mapping symbol `$x`
    that every function section of the file has (once: "static '$x' is ambiguous")."""
    for sub, k in (("old", "1"), ("new", "2")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "s.c").write_text(STATICS.replace("@K@", k))
        cross_cc(*CFLAGS, "-c", "s.c", "-o", "s.o", cwd=tmp_path / sub)
    old = tmp_path / "old"
    cross_cc(*CFLAGS, "-pie", "s.o", "-Wl,--build-id=sha1", "-o", "prog", cwd=old)
    patch = extract_patch(tmp_path / "new" / "s.o", old / "prog", ["use"])
    [call] = [fx for fx in patch.fixups if fx.type == FixupType.BRANCH26]
    assert (call.base, call.addend) == (
        FixupBase.EXE,
        elf_symbol(old / "prog", "scale")["st_value"],
    )
