"""The `__LINE__` rule from the code and the diff (patchbox.compare.lines): a program's own
assert function needs no configuration, wherever the helper using it is inlined; a
changed immediate that is not the moved line stays a change."""

from __future__ import annotations

import difflib
from pathlib import Path

from helpers import compile_c
from patchbox.compare.objects import compare_objects
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


def compare(tmp_path: Path, orig: str, patched: str, **kw: object) -> dict[str, str]:
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
    d = compare_objects(o, p, GENERIC.reporters, lines=line_maps(diff), **kw)
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
