"""The `__LINE__` rule from the code and the diff (patchbox.compare.lines): a program's own
assert function needs no configuration, wherever the helper using it is inlined; a
changed immediate that is not the moved line stays a change."""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

from helpers import compile_c
from patchbox.compare.objects import compare_objects
from patchbox.flags import PATCH_CFLAGS
from patchbox.profiles import GENERIC
from patchbox.sourcediff import line_maps

# A server's own assert: file, line and expression to its own reporting function, from a
# helper that callers inline; the fix inserts lines above the helper.
SERVER = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline, cold)) void srv_assert_fail(const char *file, int line, const char *e)
{ fprintf(stderr, "%s:%d: %s\\n", file, line, e); abort(); }
#define SRV_ASSERT(e) ((e) ? (void)0 : srv_assert_fail(__FILE__, __LINE__, #e))
int parse(int len) { return len * 2; }
static inline int checked(int v) { SRV_ASSERT(v >= 0); return v + 1; }
int caller_a(int v) { return checked(v) * 3; }
int caller_b(int v) { return checked(v - 1) + 7; }
"""
FIX = SERVER.replace(
    "int parse(int len) { return len * 2; }",
    "int parse(int len)\n{\n\tif (len > 4096)\n\t\treturn -1;\n\treturn len * 2;\n}",
)
LOGGER = """
extern void log_at(const char *func, int line, const char *msg);
#define LOG(m) log_at(__func__, __LINE__, m)
int parse(int len) { return len * 2; }
int worker(int v) { if (v < 0) LOG("negative"); return v + 1; }
"""


def compare(tmp_path: Path, orig: str, patched: str) -> dict[str, str]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(exist_ok=True)
    b.mkdir(exist_ok=True)
    o = compile_c(orig, a / "server.o", obj=True)
    p = compile_c(patched, b / "server.o", obj=True)
    diff = "".join(
        difflib.unified_diff(
            orig.splitlines(True), patched.splitlines(True), "a/server.c", "b/server.c"
        )
    )
    d = compare_objects(o, p, GENERIC.reporters, lines=line_maps(diff))
    return {x.symbol: x.verdict for x in d.decisions}


def test_own_assert_function_found_from_file_and_line(tmp_path: Path) -> None:
    got = compare(tmp_path, SERVER, FIX)
    assert got.get("parse") == "in"
    # The inlined helper's assert moved down 4 lines: not a change, wherever it is inlined.
    assert got.get("caller_a", "out") == "out" and got.get("caller_b", "out") == "out"
    assert got.get("checked", "out") == "out"


def test_without_the_diff_the_same_difference_is_a_change(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    o = compile_c(SERVER, a / "server.o", obj=True)
    p = compile_c(FIX, b / "server.o", obj=True)
    d = compare_objects(o, p, GENERIC.reporters)  # no line map: srv_assert_fail is unknown
    got = {x.symbol: x.verdict for x in d.decisions}
    assert got["caller_a"] == "in"


def test_func_string_and_line(tmp_path: Path) -> None:
    fix = LOGGER.replace(
        "int parse(int len) { return len * 2; }", "int parse(int len)\n{\n\treturn len * 3;\n}"
    )
    got = compare(tmp_path, LOGGER, fix)
    assert got["parse"] == "in" and got.get("worker", "out") == "out"


def test_a_changed_number_that_is_not_the_moved_line_is_a_change(tmp_path: Path) -> None:
    # The fix moves lines by 4 but the assert's line changes by another amount: the
    # patched file asserts on another line than the diff says.
    fix = FIX.replace("SRV_ASSERT(v >= 0);", "\n\nSRV_ASSERT(v >= 0);")
    bogus = "".join(
        difflib.unified_diff(
            SERVER.splitlines(True), FIX.splitlines(True), "a/server.c", "b/server.c"
        )
    )
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    o = compile_c(SERVER, a / "server.o", obj=True)
    p = compile_c(fix, b / "server.o", obj=True)
    d = compare_objects(o, p, GENERIC.reporters, lines=line_maps(bogus))
    got = {x.symbol: x.verdict for x in d.decisions}
    assert got["caller_a"] == "in"


CROSS_JUMPED = """
    .file "server.c"
    .section .rodata.str1.1,"aMS",@progbits,1
.LC0:
    .string "server.c"
    .section .text.exited,"ax",@progbits
    .globl exited
    .type exited,@function
exited:
    cmp $1, %edi
    je 1f
    cmp $2, %edi
    je 2f
    xor %eax, %eax
    ret
1:  mov $@A@, %edx
    jmp 3f
2:  mov $@B@, %edx
3:  lea .LC0(%rip), %rdi
    call fatal_at@PLT
    .size exited, .-exited
"""


def test_cross_jumped_reporting_call(tmp_path: Path) -> None:
    """GCC shares one reporting call between paths: each loads its line, then jumps to
    the call (OpenSSH's exited_cleanly in misc.o); the moved lines are not a change."""
    import subprocess

    objs = []
    for name, (a, b) in (("a", (10, 14)), ("b", (14, 18))):
        d = tmp_path / name
        d.mkdir()
        (d / "server.s").write_text(CROSS_JUMPED.replace("@A@", str(a)).replace("@B@", str(b)))
        subprocess.run(["as", str(d / "server.s"), "-o", str(d / "server.o")], check=True)
        objs.append(d / "server.o")
    old = "".join(f"line {i}\n" for i in range(1, 30))
    new = old.replace("line 3\n", "line 3\nx\nx\nx\nx\n")
    diff = "".join(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), "a/server.c", "b/server.c")
    )
    cmp = compare_objects(objs[0], objs[1], GENERIC.reporters, lines=line_maps(diff))
    assert {x.symbol: x.verdict for x in cmp.decisions}.get("exited", "out") == "out"
    # The same difference without the line shift is a change.
    cmp = compare_objects(
        objs[0],
        objs[1],
        GENERIC.reporters,
        lines=line_maps(
            "".join(
                difflib.unified_diff(
                    old.splitlines(True),
                    old.replace("line 9", "l9").splitlines(True),
                    "a/server.c",
                    "b/server.c",
                )
            )
        ),
    )
    assert {x.symbol: x.verdict for x in cmp.decisions}["exited"] == "in"


def test_renumbered_func_strings_pair_by_content(tmp_path: Path) -> None:
    src = (
        "extern void mylog(const char *func, const char *msg);\n"
        'void alpha(void) { mylog(__func__, "a"); }\n'
        'void beta(void) { mylog(__func__, "b"); }\n'
        'void gamma(void) { mylog(__func__, "c"); }\n'
    )
    # GCC numbers __func__.N from the end of the file: a function added last renumbers all.
    fixed = src + 'void early(void) { mylog(__func__, "e"); }\n'
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    d = compare_objects(
        compile_c(src, a / "server.o", obj=True), compile_c(fixed, b / "server.o", obj=True)
    )
    changed = [x for x in d.decisions if "read-only static data changed" in x.reason]
    assert changed == [], [(x.symbol, x.reason) for x in changed]
    assert any(x.symbol == "early" and x.verdict == "carried" for x in d.decisions)


def test_files_of_one_name_each_get_their_own_line_map(tmp_path: Path) -> None:
    """A diff changing ``a/util.c`` and ``b/util.c``: each object is checked against its
    own file's line shifts (told by its compile unit's path), not the other's."""
    fixes = {"a": FIX, "b": SERVER.replace("return v + 1;", "return v + 2;")}
    objs: dict[str, dict[str, Path]] = {}
    for side in ("orig", "new"):
        root = tmp_path / side
        for d in ("a", "b"):
            (root / d).mkdir(parents=True)
            (root / d / "util.c").write_text(fixes[d] if side == "new" else SERVER)
            subprocess.run(
                [
                    "gcc",
                    "-O2",
                    "-g",
                    "-fPIE",
                    *PATCH_CFLAGS,
                    "-c",
                    f"{d}/util.c",
                    "-o",
                    f"{d}/util.o",
                ],
                cwd=root,
                check=True,
            )
            objs.setdefault(d, {})[side] = root / d / "util.o"
    diff = "".join(
        "".join(
            difflib.unified_diff(
                SERVER.splitlines(True), fixes[d].splitlines(True), f"a/{d}/util.c", f"b/{d}/util.c"
            )
        )
        for d in ("a", "b")
    )
    lines = line_maps(diff)
    assert sorted(lines) == ["b/a/util.c", "b/b/util.c"]
    got = {
        d: {
            x.symbol: x.verdict
            for x in compare_objects(
                objs[d]["orig"], objs[d]["new"], GENERIC.reporters, lines=lines
            ).decisions
        }
        for d in ("a", "b")
    }
    # a/util.c: parse changed, the inlined assert only moved down 4 lines
    assert got["a"].get("parse") == "in"
    assert got["a"].get("caller_a", "out") == "out" and got["a"].get("caller_b", "out") == "out"
    # b/util.c: checked's result changed, so its callers did; parse did not
    assert "parse" not in got["b"] and got["b"]["caller_a"] == "in"


# A header's inline helper reports its own __FILE__ and __LINE__ (QEMU's QOM casts in
# virtio.h): a fix that adds a line at the top of the header moves them in every caller.
HEADER = """#include <stdlib.h>
__attribute__((noinline, cold)) void hdr_fail(const char *file, int line);
static inline int hdr_checked(int v) { if (v < 0) hdr_fail(__FILE__, __LINE__); return v + 1; }
"""
HEADER_FIX = "#include <stdio.h>\n" + HEADER
USER = '#include "util.h"\nint parse(int len) { return len * 2; }\n'
USER += "int caller_a(int v) { return hdr_checked(v) * 3; }\n"
USER_FIX = USER.replace("return len * 2;", "return len > 4096 ? -1 : len * 2;")


def test_a_header_s_moved_lines_are_mapped_by_the_header_s_change(tmp_path: Path) -> None:
    """The diff changes util.h (a line added above the inline helper) and parse in
    server.c: caller_a differs only in the header's __LINE__, which util.h's line map
    explains; without util.h in the diff the same difference is a change."""
    objs = {}
    for side, (h, c) in {"orig": (HEADER, USER), "new": (HEADER_FIX, USER_FIX)}.items():
        root = tmp_path / side
        root.mkdir()
        (root / "util.h").write_text(h)
        (root / "server.c").write_text(c)
        cmd = ["gcc", "-O2", "-g", "-fPIE", *PATCH_CFLAGS, "-c", "server.c", "-o", "server.o"]
        subprocess.run(cmd, cwd=root, check=True)
        objs[side] = root / "server.o"
    diffs = {
        name: "".join(
            difflib.unified_diff(o.splitlines(True), n.splitlines(True), f"a/{name}", f"b/{name}")
        )
        for name, o, n in (("util.h", HEADER, HEADER_FIX), ("server.c", USER, USER_FIX))
    }

    def verdicts(diff: str) -> dict[str, str]:
        d = compare_objects(objs["orig"], objs["new"], GENERIC.reporters, lines=line_maps(diff))
        return {x.symbol: x.verdict for x in d.decisions}

    got = verdicts(diffs["util.h"] + diffs["server.c"])
    assert got.get("parse") == "in"
    assert got.get("caller_a", "out") == "out", got
    assert verdicts(diffs["server.c"]).get("caller_a") == "in"
