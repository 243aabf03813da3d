"""`patchbox build`'s object comparison: a corpus of original/patched C pairs compiled on
the fly, one per case, each with the decision (and message) it must get."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import compile_c
from patchbox.compare.explain import annotate_inlined, format_explain
from patchbox.compare.model import ObjectDiff
from patchbox.compare.objects import (
    compare_objects,
    compare_trees,
    file_statics,
    normalize,
    other_programs,
    refuse_folded_statics,
    written_statics,
)
from patchbox.elf.binary import Binary
from patchbox.errors import BuildError, ExtractError
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS
from patchbox.pipeline import patch_from_diffs
from patchbox.profiles import get_profile
from patchbox.rebuild.workspace import check_diff
from patchbox.sourcediff import changed_lines, parse_diff
from patchbox.wire import FixupBase


def pair(
    tmp_path: Path,
    orig: str,
    patched: str,
    name: str = "case",
    *,
    extra: list[str] | None = None,
    opt: str = "-O2",
) -> tuple[Path, Path]:
    """Returns (original .o, patched .o): the same file name compiled in two directories
    (at ``opt``, with the compiler options ``extra``)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(exist_ok=True)
    b.mkdir(exist_ok=True)
    return (
        compile_c(orig, a / f"{name}.o", obj=True, extra=extra, opt=opt),
        compile_c(patched, b / f"{name}.o", obj=True, extra=extra, opt=opt),
    )


def decide(
    tmp_path: Path,
    orig: str,
    patched: str,
    profile: str = "generic",
    extra: tuple[str, ...] = (),
) -> dict[str, tuple[str, str]]:
    """Returns {symbol: (verdict, reason)} for the pair; ``extra`` names reporters."""
    o, p = pair(tmp_path, orig, patched)
    d = compare_objects(o, p, get_profile(profile).with_reporters(extra).reporters)
    return {x.symbol: (x.verdict, x.reason) for x in d.decisions}


def build_exe(tmp_path: Path, files: dict[str, str], out: str = "prog") -> Path:
    """Links a PIE from several C files (the running program's reference binary)."""
    d = tmp_path / "exe"
    d.mkdir(exist_ok=True)
    for fname, text in files.items():
        (d / fname).write_text(text)
    exe = d / out
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-g",
            "-fPIE",
            *PATCH_CFLAGS,
            "-pie",
            *[str(d / f) for f in files],
            "-o",
            str(exe),
            *LINK_FLAGS,
        ],
        check=True,
        capture_output=True,
    )
    return exe


BASE = """
int limit = 10;
__attribute__((noinline)) int f(int x) { return x * 3 + limit; }
__attribute__((noinline)) int g(int x) { return x - 1; }
"""


def test_normalize() -> None:
    assert normalize("counter.0") == "counter"
    assert normalize("foo.constprop.3") == normalize("foo.constprop.0") == "foo.constprop"
    assert normalize("foo.part.1.cold") == "foo.part.cold"
    assert normalize("plain") == "plain"


def test_changed_function(tmp_path: Path) -> None:
    got = decide(tmp_path, BASE, BASE.replace("x * 3", "x * 4"))
    assert got["f"][0] == "in" and got["f"][1].startswith("changed: code differs")
    assert "g" not in got and "limit" not in got  # unchanged: no decision


def test_unchanged_tree_has_no_decision(tmp_path: Path) -> None:
    o, p = pair(tmp_path, BASE, BASE)
    diffs, same = compare_trees({"case.o": o}, {"case.o": p})
    assert diffs == [] and same == 1


def test_new_function(tmp_path: Path) -> None:
    patched = BASE.replace(
        "__attribute__((noinline)) int f(int x) { return x * 3 + limit; }",
        '__attribute__((noinline)) static int extra(int x) { __asm__ volatile(""); return x + 7; }\n'
        "__attribute__((noinline)) int f(int x) { return extra(x) * 3 + limit; }",
    )
    got = decide(tmp_path, BASE, patched)
    assert got["extra"] == (
        "carried",
        "new function: copied into the patch if the new code uses it",
    )
    assert got["f"][0] == "in" and "extra" in got["f"][1]


def test_new_string_literal(tmp_path: Path) -> None:
    src = (
        'const char *s(int x) { return x ? "yes" : "no"; }\n'
        'const char *t(int x) { return x ? "one" : "two"; }\n'
    )
    got = decide(tmp_path, src, src.replace('"yes"', '"yes!"'))
    assert got == {"s": ("in", "changed: references 'yes!' instead of 'yes' (+0xd)")} or (
        got["s"][0] == "in" and "'yes!' instead of 'yes'" in got["s"][1] and "t" not in got
    )


def test_string_labels_shift_is_not_a_change(tmp_path: Path) -> None:
    # A new literal in the first function renumbers every .LC label after it.
    src = (
        'const char *s(int x) { return x ? "a" : "b"; }\n'
        'const char *t(int x) { return x ? "one" : "two"; }\n'
    )
    got = decide(tmp_path, src, src.replace('x ? "a" : "b"', 'x == 1 ? "a" : x == 2 ? "c" : "b"'))
    assert got["s"][0] == "in" and "t" not in got


def test_file_paths_compare_by_basename(tmp_path: Path) -> None:
    src = "const char *where(void) { return SRC; }\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    o = compile_c(src, tmp_path / "a" / "case.o", obj=True, extra=['-DSRC="/one/dir/x.c"'])
    p = compile_c(src, tmp_path / "b" / "case.o", obj=True, extra=['-DSRC="/two/x.c"'])
    assert compare_objects(o, p).decisions == ()


def test_new_static_variable(tmp_path: Path) -> None:
    patched = BASE.replace("int limit = 10;", "int limit = 10;\nstatic int seen;").replace(
        "return x - 1;", "seen++; return x - 1;"
    )
    got = decide(tmp_path, BASE, patched)
    assert got["seen"][0] == "carried" and got["seen"][1].startswith("new variable")
    assert got["g"][0] == "in" and "seen" in got["g"][1]


def test_changed_initial_value_refused(tmp_path: Path) -> None:
    o, p = pair(tmp_path, BASE, BASE.replace("limit = 10", "limit = 20"))
    d = compare_objects(o, p)
    assert d.refusals == [
        "limit: initial value of existing variable changed: the running "
        "program keeps its current value, code replacement cannot change it"
    ]
    with pytest.raises(ExtractError, match=r"refused: case.o: limit: initial value"):
        patch_from_diffs([d], "/nonexistent")


def test_changed_object_size_refused(tmp_path: Path) -> None:
    src = "struct conf { int a; } conf;\nint get(void) { return conf.a; }\n"
    got = decide(tmp_path, src, src.replace("int a;", "int a; int b;"))
    assert got["conf"] == (
        "refused",
        "size of existing variable changed (4 -> 8 bytes; a "
        "changed type or struct layout): code replacement cannot change "
        "data the program already has",
    )


def test_static_folded_into_initial_value_refused(tmp_path: Path) -> None:
    """The diff removes the only store to a static variable: GCC then folds every read
    into the initial value and drops the variable, so the new get() would return 5
    while the running program's state holds whatever bump() made of it (found by the
    differential test, docs/differential.md)."""
    src = (
        "static int state = 5;\n"
        "void bump(void) { state = state * 3 + 1; }\n"
        "int get(void) { return state; }\n"
    )
    o, p = pair(tmp_path, src, src.replace("state = state * 3 + 1;", ""))
    d = compare_objects(o, p)
    assert d.refusals == [
        "state: writable static variable used by the replaced bump, get is gone from the "
        "patched object: if nothing in the new code stores to it, the compiler folded it "
        "into its initial value, and the new code would read that instead of the running "
        "program's current value"
    ]


def test_static_made_read_only_refused(tmp_path: Path) -> None:
    """The diff removes the only store to a static array: GCC moves it to .rodata, and
    the new get() would read the patch's copy of {1, 2, 3, 4}, not the running
    program's array (Csmith seed 178, docs/differential.md)."""
    src = (
        "static int table[4] = {1, 2, 3, 4};\n"
        "void set(int i) { table[i & 3] = 9; }\n"
        "int get(int i) { return table[i & 3]; }\n"
    )
    o, p = pair(tmp_path, src, src.replace("table[i & 3] = 9;", ""))
    d = compare_objects(o, p)
    assert d.refusals == [
        "table: writable static variable is read-only in the patched object: nothing in the "
        "new code stores to it, so the compiler made it a constant, and the new code would "
        "read its initial value instead of the running program's current value"
    ]


def test_static_read_only_in_the_program_written_by_the_new_code_refused(
    tmp_path: Path,
) -> None:
    """The other way round: nothing stored to the array, so the running program has it
    in .rodata; the diff adds a store. Bound to the program's copy, set() would fault."""
    src = (
        "static int table[4] = {1, 2, 3, 4};\n"
        "void set(int i) { (void)i; }\n"
        "int get(int i) { return table[i & 3]; }\n"
    )
    o, p = pair(tmp_path, src, src.replace("(void)i;", "table[i & 3] = 9;"))
    d = compare_objects(o, p)
    assert d.refusals == [
        "table: static variable is read-only in the running program (nothing stored to it, "
        "so the compiler made it a constant) and the new code stores to it: that store "
        "would fault"
    ]


def test_static_of_a_removed_function_is_not_refused(tmp_path: Path) -> None:
    """A variable that only a removed function used goes with it: the program keeps both."""
    src = "int old_api(void) { static int n; return ++n; }\nint api(int x) { return x + 1; }\n"
    got = decide(tmp_path, src, "int api(int x) { return x + 2; }\n")
    assert got["n.0"][0] == "out" and got["api"][0] == "in"


def test_changed_static_local_initial_value_refused(tmp_path: Path) -> None:
    src = "int tick(void) { static int n = 1; return n++; }\n"
    got = decide(tmp_path, src, src.replace("n = 1", "n = 5"))
    assert got["n.0"][0] == "refused"


def test_line_only_change_ignored(tmp_path: Path) -> None:
    src = """
extern void __assert_fail(const char *, const char *, unsigned, const char *)
    __attribute__((noreturn));
#define REPORT(msg) __assert_fail(msg, __FILE__, __LINE__, __func__)
int check(int x) { if (x < 0) REPORT("negative"); return x * 2; }
int other(int x) { if (x > 100) REPORT("big"); return x + 1; }
"""
    patched = src.replace("#define REPORT", "/* one more line */\n#define REPORT")
    got = decide(tmp_path, src, patched)
    assert (
        got["check"][0] == "out"
        and "__LINE__" in got["check"][1]
        and "__assert_fail" in got["check"][1]
    )
    assert got["other"][0] == "out"
    # A real change next to it is still a change.
    got = decide(tmp_path, src, patched.replace("x * 2", "x * 5"))
    assert got["check"][0] == "in" and got["other"][0] == "out"


def test_line_change_to_non_reporter_is_a_change(tmp_path: Path) -> None:
    src = """
extern void log_line(const char *, int);
int check(int x) { if (x < 0) log_line("neg", __LINE__); return x * 2; }
"""
    patched = "\n" + src
    assert decide(tmp_path, src, patched)["check"][0] == "in"
    got = decide(tmp_path, src, patched, extra=("log_line",))  # --reporter log_line
    assert got["check"][0] == "out"


def test_qemu_profile_reporters(tmp_path: Path) -> None:
    src = """
typedef struct Error Error;
extern void error_setg_internal(Error **, const char *, int, const char *, const char *, ...);
#define error_setg(errp, fmt, ...) \\
    error_setg_internal((errp), __FILE__, __LINE__, __func__, (fmt), ## __VA_ARGS__)
int realize(int x, Error **errp) { if (x < 0) { error_setg(errp, "bad %d", x); return -1; } return 0; }
"""
    patched = "\n\n" + src
    assert decide(tmp_path, src, patched)["realize"][0] == "in"  # generic: not a reporter
    got = decide(tmp_path, src, patched, profile="qemu")
    assert got["realize"][0] == "out" and "error_setg_internal" in got["realize"][1]


def test_inlined_into_callers_included(tmp_path: Path) -> None:
    src = """
static inline int sq(int x) { return x * x; }
int f(int x) { return sq(x) + 1; }
int g(int x) { return sq(x + 1) - 1; }
int h(int x) { return x; }
"""
    o, p = pair(tmp_path, src, src.replace("x * x", "x * x + 3"), extra=["-g"])
    d = compare_objects(o, p)
    diff = (
        "--- a/case.c\n+++ b/case.c\n@@ -2 +2 @@\n"
        "-static inline int sq(int x) { return x * x; }\n"
        "+static inline int sq(int x) { return x * x + 3; }\n"
    )
    assert changed_lines(diff) == {"case.c": {2}}
    [d] = annotate_inlined([d], diff)
    got = {x.symbol: (x.verdict, x.reason) for x in d.decisions}
    assert got["f"][0] == "in" and got["g"][0] == "in" and "h" not in got
    assert got["f"][1].endswith("(it inlines sq, changed by the diff)")


def test_cold_part_change_includes_parent(tmp_path: Path) -> None:
    src = """
#include <stdio.h>
extern int errors;
__attribute__((cold, noinline)) void slow(void);
int work(int x, int y) {
    if (x < 0) { slow(); fprintf(stderr, "negative %d %d\\n", x, y); errors++; return -1; }
    for (int i = 0; i < y; i++) x += i * y;
    return x + 1;
}
"""
    got = decide(tmp_path, src, src.replace("negative %d", "below zero %d"))
    assert got["work.cold"][0] == "carried" and "GCC clone changed" in got["work.cold"][1]
    assert got["work"] == ("in", "changed: calls changed clone work.cold")


def test_constprop_isra_clones(tmp_path: Path) -> None:
    src = """
struct big { int a, b, c, d; };
__attribute__((noinline)) static int mul(int x, int k) { return x * k + 1; }
__attribute__((noinline)) static int geta(struct big *p) { return p->a * 7; }
int f1(int x) { return mul(x, 3); }
int f2(int x) { return mul(x + 1, 3); }
int f3(struct big *p) { return geta(p) + 1; }
"""
    o, p = pair(tmp_path, src, src.replace("x * k + 1", "x * k + 2"))
    d = compare_objects(o, p)
    got = {x.symbol: x.verdict for x in d.decisions}
    assert got == {"mul.constprop.0": "carried", "f1": "in", "f2": "in"}
    assert d.clones == {"mul.constprop.0"} and sorted(d.functions) == ["f1", "f2"]
    # Renumbered clones (mul.constprop.0 -> .4, geta.isra.0 -> .2) still correlate.
    q = tmp_path / "renamed.o"
    subprocess.run(
        [
            "objcopy",
            "--redefine-sym",
            "mul.constprop.0=mul.constprop.4",
            "--redefine-sym",
            "geta.isra.0=geta.isra.2",
            str(o),
            str(q),
        ],
        check=True,
    )
    assert compare_objects(o, q).decisions == ()


def test_renumbered_static_local_is_the_same_variable(tmp_path: Path) -> None:
    src = "int tick(void) { static int n; return ++n; }\n"
    patched = src.replace("++n", "n += 2") + "int first(void) { static int z; return z--; }\n"
    got = decide(tmp_path, src, patched)
    assert got["tick"][0] == "in"
    assert got["z.0"][0] == "carried" and "n.1" not in got  # n.0 -> n.1: same variable


def test_changed_readonly_table_makes_users_change(tmp_path: Path) -> None:
    src = """
int pick(int i) { static const int tbl[] = {1, 2, 3, 4, 5, 6}; return tbl[i & 3]; }
int other(int i) { return i; }
"""
    got = decide(tmp_path, src, src.replace("{1, 2, 3", "{1, 9, 3"))
    assert got["pick"][0] == "in" and got["tbl.0"][0] == "carried" and "other" not in got


def test_changed_assembly_refused() -> None:
    diff = (
        "--- a/boot.S\n+++ b/boot.S\n@@ -1 +1 @@\n-ret\n+nop\n"
        "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@ int f(void)\n-1\n+2\n"
    )
    with pytest.raises(BuildError, match=r"assembly file b/boot.S is changed by the diff"):
        check_diff(diff)
    check_diff(diff.split("--- a/x.c", maxsplit=1)[0].replace("boot.S", "boot.c"))  # C is fine


def test_static_local_stays_bound(tmp_path: Path) -> None:
    src = """
__attribute__((noinline)) int tick(void) { static int n; return ++n; }
int main(void) { return tick(); }
"""
    exe = build_exe(tmp_path, {"case.c": src})
    o, p = pair(tmp_path, src, src.replace("++n", "n += 2"), extra=["-g"])
    d = compare_objects(o, p)
    assert d.functions == ("tick",)
    patch = patch_from_diffs([d], exe)
    with Binary(exe) as b:
        n = next(s for s in b.iter_locals("case.c") if s.name.startswith("n."))
    assert patch.data == b"" and patch.bss_size == 0  # no fresh copy of n
    assert {f.addend + 4 for f in patch.fixups if f.base == FixupBase.EXE} == {n.address}


MAIN = "int a(int); int main(void) { return a(1); }\n"
A = "__attribute__((noinline)) int a(int x) { return x + 1; }\n"
B = (
    "__attribute__((noinline)) static int helper(int x) { return x * 2; }\n"
    "int b(int x) { return helper(x); }\n"
)
A_HELPER = (
    '__attribute__((noinline)) static int helper(int x) { __asm__ volatile(""); '
    "return x + 3; }\nint a(int x) { return helper(x) + 1; }\n"
)


def _objs(tmp_path: Path, tag: str, files: dict[str, str]) -> dict[str, Path]:
    d = tmp_path / tag
    d.mkdir()
    return {
        f"{n[:-2]}.o": compile_c(t, d / f"{n[:-2]}.o", obj=True, extra=["-g"])
        for n, t in files.items()
    }


def test_several_objects_one_patch_static_names_by_file(tmp_path: Path) -> None:
    files = {"main.c": MAIN, "a.c": A_HELPER, "b.c": B}
    exe = build_exe(tmp_path, files)
    orig = _objs(tmp_path, "orig", files)
    new = _objs(
        tmp_path,
        "new",
        {**files, "a.c": A_HELPER.replace("x + 3", "x + 4"), "b.c": B.replace("x * 2", "x * 5")},
    )
    diffs, same = compare_trees(orig, new)
    assert same == 1 and [d.functions for d in diffs] == [("helper",), ("helper",)]
    patch = patch_from_diffs(diffs, exe)
    with Binary(exe) as b:
        found = [b.find_symbol("helper", src, local=True) for src in ("a.c", "b.c")]
    want = {s.address for s in found if s is not None}
    assert len(want) == len(found)
    assert {f.target for f in patch.functions} == want
    assert patch.meta["source:helper"] == "a.c" and patch.meta["source:helper@b.c"] == "b.c"
    text = format_explain(diffs, same)
    assert "a.o (a.c):" in text and "1 object file(s) without a difference" in text


def test_new_global_defined_in_another_object(tmp_path: Path) -> None:
    files = {"main.c": MAIN, "a.c": A, "b.c": B}
    exe = build_exe(tmp_path, files)
    orig = _objs(tmp_path, "orig", files)
    new = _objs(
        tmp_path,
        "new",
        {
            **files,
            "a.c": "int b_new(int);\n" + A.replace("x + 1", "b_new(x) + 1"),
            "b.c": B + "__attribute__((noinline)) int b_new(int x) { return x * 11; }\n",
        },
    )
    diffs, _same = compare_trees(orig, new)
    by = {d.rel: d for d in diffs}
    assert by["a.o"].functions == ("a",) and by["b.o"].new_globals == {"b_new"}
    patch = patch_from_diffs(diffs, exe)
    assert [f.symbol for f in patch.functions] == ["a"]
    assert not any(f.base == FixupBase.IMPORT for f in patch.fixups)  # b_new is in the patch
    calls = [f for f in patch.fixups if f.base == FixupBase.TEXT]
    assert calls and all(0 <= f.addend + 4 < len(patch.text) for f in calls)
    assert patch.meta.get("new:b_new") == "text"


def test_no_change_refused(tmp_path: Path) -> None:
    src = (
        "extern void __assert_fail(const char *, const char *, unsigned, const char *);\n"
        'int c(int x) { if (x) __assert_fail("x", __FILE__, __LINE__, __func__); return 1; }\n'
    )
    o, p = pair(tmp_path, src, "\n" + src)
    diffs, _ = compare_trees({"case.o": o}, {"case.o": p})
    with pytest.raises(ExtractError, match="the diff changes no function"):
        patch_from_diffs(diffs, "/nonexistent")


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs patch(1)")
def test_workspace_never_touches_the_tree(tmp_path: Path) -> None:
    from patchbox.rebuild.workspace import Workspace

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.c").write_text("int f(void) { return 1; }\n")
    (src / "Makefile").write_text("x.o: x.c\n\t$(CC) $(CFLAGS) -O2 -fPIE -c x.c -o x.o\n")
    diff = tmp_path / "d.patch"
    diff.write_text(
        "--- x.c\n+++ x.c\n@@ -1 +1 @@\n-int f(void) { return 1; }\n+int f(void) { return 2; }\n"
    )
    with Workspace(src) as ws:
        ws.copy_source()
        ws.build("make", 2, "original")
        orig = ws.stash_objects()
        assert ws.apply_diff(diff) == 0
        ws.build("make", None, "patched")
        diffs, _same = compare_trees(orig, ws.objects())
        assert [d.functions for d in diffs] == [("f",)]
        root = ws.root
    assert not root.exists()
    assert (src / "x.c").read_text() == "int f(void) { return 1; }\n"
    assert sorted(p.name for p in src.iterdir()) == ["Makefile", "x.c"]


def test_tree_that_does_not_rebuild_the_binary_refused(tmp_path: Path) -> None:
    src = (
        "__attribute__((noinline)) int f(int x) { return x * 3 + 1; }\n"
        "int main(int c, char **v) { (void)v; return f(c); }\n"
    )
    exe = build_exe(tmp_path, {"case.c": src})
    o, p = pair(tmp_path, src, src.replace("x * 3", "x * 4"), opt="-O0")  # other flags
    d = compare_objects(o, p)
    with pytest.raises(ExtractError, match="the tree does not rebuild the running binary"):
        patch_from_diffs([d], exe)


def test_objects_of_other_programs_are_left_out(tmp_path: Path) -> None:
    """A tree building two programs (OpenSSH: sshd and ssh-agent): only the compile units
    linked into the running binary are compared."""
    orig, patched = {}, {}
    for name, src, fixed in (
        ("a.c", "int main(void) { return 1; }\n", "int main(void) { return 1; }\n"),
        ("b.c", "int main(void) { return 2; }\n", "int main(void) { return 3; }\n"),
        ("util.c", "int util(int x) { return x + 1; }\n", "int util(int x) { return x + 2; }\n"),
    ):
        o, p = pair(tmp_path, src, fixed, name=name[:-2])
        orig[name[:-2] + ".o"], patched[name[:-2] + ".o"] = o, p
    diffs, _same = compare_trees(orig, patched, linked={"a.c", "util.c"})
    assert [d.rel for d in diffs] == ["util.o"]
    diffs, _same = compare_trees(orig, patched)
    assert [d.rel for d in diffs] == ["b.o", "util.o"]


def test_source_compiled_for_two_programs(tmp_path: Path) -> None:
    """memcached builds memcached and memcached-debug from the same sources with other
    flags: the debug program's object of a file linked into the binary is not compared."""
    src = (
        "__attribute__((noinline)) int f(int x) { return x * 3 + 1; }\n"
        "int main(int c, char **v) { (void)v; return f(c); }\n"
    )
    exe = build_exe(tmp_path, {"case.c": src})
    (tmp_path / "o2").mkdir()
    (tmp_path / "o0").mkdir()
    fast = compile_c(src, tmp_path / "o2" / "case.o", obj=True)
    debug = compile_c(src, tmp_path / "o0" / "case.o", obj=True, opt="-O0")
    with Binary(exe) as ref:
        assert other_programs({"case.o": fast, "debug-case.o": debug}, ref) == {"debug-case.o"}
        assert other_programs({"case.o": fast}, ref) == set()


def folded_check(tmp_path: Path, src: str, fixed: str) -> ObjectDiff:
    """Returns the diff of case.c's objects (``src`` → ``fixed``) after the folded-static
    check, which reads ``src`` as the changed file's text before the diff."""
    o, p = pair(tmp_path, src, fixed)
    d = compare_objects(o, p)
    diff = "".join(
        difflib.unified_diff(src.splitlines(True), fixed.splitlines(True), "a/case.c", "b/case.c")
    )
    (d,) = refuse_folded_statics([d], parse_diff(diff), lambda change: src)
    return d


def test_static_folded_in_both_objects_refused_from_the_source(tmp_path: Path) -> None:
    """The original stores a constant to a static and reads it in the same function: GCC
    drops the variable, its value lives only in code. The diff removes the store. Neither
    object names the variable; the original source does, and so do the diff's removed
    lines: refused (Csmith seed 1114, docs/differential.md)."""
    src = (
        "static int mode = 7;\n"
        "static void set_mode(void) { mode = 1; }\n"
        "int run(void) { set_mode(); return mode; }\n"
    )
    fixed = src.replace("mode = 1;", "")
    o, p = pair(tmp_path, src, fixed)
    assert compare_objects(o, p).refusals == []  # nothing in the objects shows it
    d = folded_check(tmp_path, src, fixed)
    assert len(d.refusals) == 1 and d.refusals[0].startswith(
        "mode: static mode of case.c is not in the original object: the compiler folded it away"
    ), d.refusals
    assert file_statics(src) == {"mode"}


def test_folded_static_refused_in_its_own_file_of_a_shared_name(tmp_path: Path) -> None:
    """The diff removes the store in a/util.c and changes b/util.c too: the refusal is
    a/util.c's object's (its compile unit's path), not b/util.c's, which has no such
    static either."""
    src = {
        "a": (
            "static int mode = 7;\n"
            "static void set_mode(void) { mode = 1; }\n"
            "int run(void) { set_mode(); return mode; }\n"
        ),
        "b": "int other(int x) { return x + 1; }\n",
    }
    fixed = {"a": src["a"].replace("mode = 1;", ""), "b": src["b"].replace("+ 1", "+ 2")}
    diffs = []
    for d in ("a", "b"):
        objs = []
        for side, text in (("orig", src[d]), ("new", fixed[d])):
            (tmp_path / side / d).mkdir(parents=True)
            (tmp_path / side / d / "util.c").write_text(text)
            flags = ["-O2", "-g", "-fPIE", *PATCH_CFLAGS]
            subprocess.run(
                ["gcc", *flags, "-c", f"{d}/util.c", "-o", f"{d}/util.o"],
                cwd=tmp_path / side,
                check=True,
            )
            objs.append(tmp_path / side / d / "util.o")
        diffs.append(compare_objects(objs[0], objs[1], rel=f"{d}/util.o"))
    diff = "".join(
        "".join(
            difflib.unified_diff(
                src[d].splitlines(True), fixed[d].splitlines(True), f"a/{d}/util.c", f"b/{d}/util.c"
            )
        )
        for d in ("a", "b")
    )
    da, db = refuse_folded_statics(
        diffs, parse_diff(diff), lambda change: src[(change.old or "")[2]]
    )
    assert [r.split(":")[0] for r in da.refusals] == ["mode"], da.refusals
    assert db.refusals == []


def test_static_written_through_a_pointer_and_folded_refused(tmp_path: Path) -> None:
    """Csmith seed 1114 itself: the store goes through a pointer to the static, so the
    diff's removed line does not name it; the source takes its address."""
    src = (
        "static int g_4 = 0x102D;\n"
        "static int func_1(void) { int *l_3 = &g_4; (*l_3) = 1; return 0; }\n"
        "int run(void) { func_1(); return g_4; }\n"
    )
    fixed = src.replace("(*l_3) = 1; ", "")
    d = folded_check(tmp_path, src, fixed)
    assert [r.split(":")[0] for r in d.refusals] == ["g_4"], d.refusals
    assert written_statics(src, {"g_4"}) == {"g_4"}
    assert written_statics("static int k = 1;\nint f(void) { return k == 2; }\n", {"k"}) == set()


def test_file_statics_reads_file_scope_definitions_only() -> None:
    text = (
        "static int a = 1, b;\n"
        "static const char *names[3] = {0};\n"
        "static int f(int x) { static int inner = 2; return x + inner; }\n"
        "static struct s *head;\n"
        "int g(void)\n{\n    static int counter;\n    return counter++;\n}\n"
    )
    assert file_statics(text) == {"a", "names", "head"}


def _written_one_by_one(text: str, names: set[str]) -> set[str]:
    """The first written_statics: one search per name (the reference the one-pass search
    must agree with)."""
    import re

    from patchbox.compare.objects import _STATIC_DEF

    out = set()
    for name in names:
        n = re.escape(name)
        write = (
            rf"&\s*{n}\b|\b{n}\s*(?:\[[^\]]*\]\s*)*"
            rf"(?:[-+*/%&|^]|<<|>>)?=(?!=)|\b{n}\s*(?:\+\+|--)|(?:\+\+|--)\s*{n}\b"
        )
        body = [line for line in text.splitlines() if not _STATIC_DEF.match(line)]
        if any(re.search(write, line) for line in body):
            out.add(name)
    return out


TOKENS = ["g", "g_4", "g_45", "x", "1", " ", "&", "&&", "=", "==", "+=", "<<=", "++", "--"]
TOKENS += ["[", "]", "[i]", "(", ")", ";", "*", "+", "!", "static int g;", "\n", "-"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30))
def test_written_statics_in_one_pass_agrees_with_one_search_per_name(tokens: list[str]) -> None:
    text = "".join(tokens)
    names = {"g", "g_4", "g_45", "x", "i"}
    assert written_statics(text, names) == _written_one_by_one(text, names), repr(text)


def test_folded_static_left_alone_by_a_diff_that_does_not_write_it(tmp_path: Path) -> None:
    """A static folded away in the original, which the diff neither names nor can write
    (no store through a pointer): its state is not the diff's business, nothing refused."""
    src = (
        "static int mode = 7;\n"
        "static void set_mode(void) { mode = 1; }\n"
        "int run(void) { set_mode(); return mode; }\n"
        "int other(int x) { return x + 1; }\n"
    )
    fixed = src.replace("x + 1", "x + 2")
    d = folded_check(tmp_path, src, fixed)
    assert d.refusals == [] and d.functions == ("other",)


def test_folded_static_whose_store_only_changes_is_left_alone(tmp_path: Path) -> None:
    """The diff changes the value a pointer store writes (the store stays): the new code
    sets the state itself, nothing it reads comes from what the old code set."""
    src = (
        "static int g_4 = 0x102D;\n"
        "static int func_1(void) { int *l_3 = &g_4; (*l_3) = 1; return 0; }\n"
        "int run(void) { func_1(); return g_4; }\n"
    )
    fixed = src.replace("(*l_3) = 1;", "(*l_3) = 2;")
    d = folded_check(tmp_path, src, fixed)
    assert d.refusals == [] and d.functions == ("run",)
