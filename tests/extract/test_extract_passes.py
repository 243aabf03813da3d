"""The extraction passes one at a time (:mod:`patchbox.extract.combine` runs them in
order): each returns a value the next reads, and none depends on being called in an
order, or once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import compile_c
from patchbox.elf.binary import Binary
from patchbox.elf.fastread import load_object
from patchbox.extract.closure import close
from patchbox.extract.emit import emit, layout
from patchbox.extract.model import Member, SectionKind, TargetKind
from patchbox.extract.replaced import find_hooks, find_replaced
from patchbox.flags import LINK_FLAGS
from patchbox.wire import FixupBase, RedirectKind

ORIG = r"""
#include <stdio.h>
static __attribute__((noipa)) int helper(int x) { return x * 3; }
__attribute__((noipa)) int compute(int x) { return helper(x) + 1; }
__attribute__((noipa)) int show(int x) { char b[32]; snprintf(b, sizeof b, "v=%d", x); return b[2]; }
int main(int argc, char **argv) { (void)argv; return compute(argc) + show(argc); }
"""
PATCHED = ORIG.replace(
    "__attribute__((noipa)) int compute(int x) { return helper(x) + 1; }",
    "static __attribute__((noipa)) int fresh(int x) { return x ^ 0x5a5a; }\n"
    "__attribute__((noipa)) int compute(int x) { return helper(x) + fresh(x); }",
).replace('"v=%d"', '"patched %d!"')


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("passes")
    (d / "new").mkdir()
    return compile_c(ORIG, d / "prog"), compile_c(PATCHED, d / "new" / "prog.o", obj=True)


def member(obj_path: Path, binary: Binary, names: tuple[str, ...], index: int = 0) -> Member:
    obj = load_object(obj_path)
    warnings: list[str] = []
    replaced = find_replaced(obj, binary, names, warnings)
    assert warnings == []
    return Member(index, obj, names, replaced, find_hooks(obj))


def test_find_replaced(built: tuple[Path, Path]) -> None:
    exe, obj = built
    with Binary(exe) as b:
        [r] = find_replaced(load_object(obj), b, ("compute",), [])
        orig = b.find_symbol("compute", local=False)
        assert orig is not None and r.address == orig.address
        assert r.kind == RedirectKind.PATCHABLE_ENTRY and r.skip == 0 and not r.held
        assert r.expected == b.read(orig.address - 6, len(r.expected))


def test_closure_copies_and_targets(built: tuple[Path, Path]) -> None:
    exe, obj = built
    with Binary(exe) as b:
        m = member(obj, b, ("compute", "show"))
        [c] = close([m], b)
        helper = b.find_symbol("helper", m.source, local=True)
    kinds = {m.obj.get_section(i).name: k for i, k in c.copied}
    assert kinds[".text.compute"] is SectionKind.FUNC and kinds[".text.fresh"] is SectionKind.FUNC
    assert kinds[".rodata.show.str1.1"] is SectionKind.RODATA  # the string literal
    # statics are reached through their section's symbol
    targets = {b.reloc.symbol.name: b.target for b in c.bindings}
    assert helper is not None and targets[".text.helper"].kind is TargetKind.EXE
    # the program's static, by file: its section starts 6 NOPs before the symbol
    assert targets[".text.helper"].value == helper.address - 6
    assert targets[".text.fresh"].kind is TargetKind.COPY  # new: copied
    assert targets["snprintf"].kind is TargetKind.IMPORT


def test_layout_and_emit_find_nothing_and_keep_no_order(built: tuple[Path, Path]) -> None:
    exe, obj = built
    with Binary(exe) as b:
        m = member(obj, b, ("compute", "show"))
        [c] = close([m], b)
        assert close([m], b) == (c,)  # the same value, however often
    lay = layout(m, c)
    first = next(i for i, k in c.copied if k is SectionKind.FUNC)
    assert lay.placement[first][1] == 0  # the first replaced function starts the text
    out = emit(m, c, [lay])
    assert emit(m, c, [layout(m, c)]) == out
    stub = m.obj.arch.branches.stub_size
    assert len(out.text) >= len(lay.text) + stub  # snprintf's stub after the copies
    assert {f.fixup.base for f in out.fixups} >= {FixupBase.EXE, FixupBase.IMPORT}


def test_member_targets_across_objects(tmp_path: Path) -> None:
    """a.o calls b_new, a new global of b.o: b.o replaces nothing but copies b_new, and
    a.o's call targets that copy (MEMBER) — found before anything is laid out."""
    main = "int a(int);\nint main(int c, char **v) { (void)v; return a(c); }\n"
    a = "__attribute__((noinline)) int a(int x) { return x + 1; }\n"
    b = "__attribute__((noinline)) int b(int x) { return x * 3; }\n"
    objs = [
        compile_c(s, tmp_path / f"{n}.o", obj=True) for n, s in (("m", main), ("a", a), ("b", b))
    ]
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-pie", *map(str, objs), "-o", str(exe), *LINK_FLAGS], check=True)
    (tmp_path / "new").mkdir()
    new_a = compile_c(
        "int b_new(int);\n" + a.replace("x + 1", "b_new(x) + 1"), tmp_path / "new" / "a.o", obj=True
    )
    new_b = compile_c(
        b + "__attribute__((noinline)) int b_new(int x) { return x * 11; }\n",
        tmp_path / "new" / "b.o",
        obj=True,
    )
    with Binary(exe) as binary:
        members = [member(new_a, binary, ("a",), 0), member(new_b, binary, (), 1)]
        ca, cb = close(members, binary)
    [call] = [x.target for x in ca.bindings if x.reloc.symbol.name == "b_new"]
    assert call.kind is TargetKind.MEMBER and call.member == 1
    assert [members[1].obj.get_section(i).name for i, _k in cb.copied] == [".text.b_new"]
    layouts = [layout(m, c) for m, c in zip(members, (ca, cb))]
    # emitting the second member first changes nothing: no pass depends on another's call
    later = emit(members[1], cb, layouts)
    assert emit(members[0], ca, layouts).fixups[0].into in (0, 1)
    assert emit(members[1], cb, layouts) == later
