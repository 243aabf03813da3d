"""Data the running program holds cannot change layout: struct layouts from DWARF, and
every changed data item named (patchbox.compare.types, compare_objects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import compile_c
from patchbox.compare.objects import compare_objects
from patchbox.compare.types import layout_changes, read_layouts
from patchbox.errors import ExtractError
from patchbox.pipeline import patch_from_diffs

SRC = """
struct conn { int fd; char *buf; unsigned len; };
struct conn *conn_new(void);
int conn_fill(struct conn *c, int n) { c->len += n; return c->fd; }
static const int limits[4] = {1, 2, 3, 4};
int limit(int i) { return limits[i & 3]; }
"""


def compare(tmp_path: Path, orig: str, patched: str) -> dict[str, tuple[str, str]]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(exist_ok=True)
    b.mkdir(exist_ok=True)
    o = compile_c(orig, a / "conn.o", obj=True, extra=["-g"])
    p = compile_c(patched, b / "conn.o", obj=True, extra=["-g"])
    return {x.symbol: (x.verdict, x.reason) for x in compare_objects(o, p).decisions}


def test_new_member_refused_naming_struct_and_member(tmp_path: Path) -> None:
    fixed = SRC.replace("unsigned len; };", "unsigned len; unsigned cap; };").replace(
        "c->len += n;", "c->len += n; if (c->len > c->cap) return -1;"
    )
    got = compare(tmp_path, SRC, fixed)
    verdict, reason = got["struct conn"]
    assert verdict == "refused"
    assert "'cap' added at +20" in reason  # in the padding: same size, new layout
    bigger = SRC.replace("unsigned len; };", "unsigned len; long total; };")
    assert "size 24 -> 32 bytes" in compare(tmp_path, SRC, bigger)["struct conn"][1]
    assert got["conn_fill"][0] == "in"


def test_member_retyped_and_moved(tmp_path: Path) -> None:
    fixed = SRC.replace("int fd; char *buf;", "long fd; char *buf;")
    reason = compare(tmp_path, SRC, fixed)["struct conn"][1]
    assert "member 'fd' type changed" in reason and "member 'buf' moved" not in reason


def test_unchanged_layout_no_decision(tmp_path: Path) -> None:
    got = compare(tmp_path, SRC, SRC.replace("c->len += n;", "c->len += 2 * n;"))
    assert "struct conn" not in got and got["conn_fill"][0] == "in"


def test_refusal_names_every_data_item(tmp_path: Path) -> None:
    fixed = (
        SRC.replace("unsigned len; };", "unsigned len; unsigned cap; };")
        .replace(
            "static const int limits[4] = {1, 2, 3, 4};",
            "static const int limits2[8] = {1, 2, 3, 4, 5, 6, 7, 8};",
        )
        .replace("limits[i & 3]", "limits2[i & 7]")
        .replace("int limit(int i)", "int spare_counter;\nint limit(int i)")
    )
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    d = compare_objects(
        compile_c(SRC, a / "conn.o", obj=True, extra=["-g"]),
        compile_c(fixed, b / "conn.o", obj=True, extra=["-g"]),
    )
    with pytest.raises(ExtractError) as err:
        patch_from_diffs([d], "/nonexistent")
    msg = str(err.value)
    assert "struct conn" in msg and "limits2 (new variable" in msg
    assert "limits (removed" in msg and "spare_counter (new variable" in msg


def test_read_layouts_anonymous_typedef(tmp_path: Path) -> None:
    o = compile_c(
        "typedef struct { int a; short b; } Pair;\nPair p;\n",
        tmp_path / "t.o",
        obj=True,
        extra=["-g"],
    )
    layouts = read_layouts(o)
    assert layouts["struct (typedef) Pair"].size == 8
    assert layout_changes(layouts, layouts) == []
