"""The build pipeline pass by pass (:mod:`patchbox.pipeline`): each test stops after a
pass and looks at the value it made, on a small make tree compiled on the fly."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from patchbox.compare.model import ItemKind, Verdict
from patchbox.elf.binary import Binary
from patchbox.errors import BuildError, ExtractError
from patchbox.format.layout import load_patch
from patchbox.pipeline import (
    NO_FUNCTION,
    BuildRequest,
    Comparison,
    Plan,
    build_patch,
    check,
    compare,
    explain,
    extract,
    patch_from_diffs,
    plan,
    rebuild,
    refuse,
    workspace,
    write,
)
from patchbox.rebuild.incremental import IncrementalBuild
from patchbox.rebuild.workspace import Rebuilt, Workspace

BIN = Path(sys.executable).parent
MAKEFILE = """\
CFLAGS += -O2 -fPIE $(shell patchbox config --cflags)
prog: main.o a.o b.o
\t$(CC) -pie main.o a.o b.o -Wl,--build-id=sha1 -o $@
%.o: %.c
\t$(CC) $(CFLAGS) -c $< -o $@
"""
FILES = {
    "main.c": "int a(int); int b(int);\n"
    "int main(int c, char **v) { (void)v; return a(c) + b(c); }\n",
    "a.c": "static inline int sq(int x) { return x * x; }\n"
    "__attribute__((noinline)) int a(int x) { return sq(x) + 1; }\n",
    "b.c": "int limit = 7;\n__attribute__((noinline)) int b(int x) { return x * 3 + limit; }\n",
}
# a changes; b calls a new global of a.c; a.c's new static helper is carried.
FIXED = {
    "a.c": FILES["a.c"].replace("sq(x) + 1;", "sq(x) + 2;")
    + "__attribute__((noinline)) int a_new(int x) { return x * 11; }\n",
    "b.c": "int a_new(int);\n" + FILES["b.c"].replace("x * 3 + limit", "a_new(x) + limit"),
}


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture()
def request_(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BuildRequest:
    """Returns a build request for a built tree and its fix (a -p1 diff)."""
    monkeypatch.setenv("PATH", _env()["PATH"])  # the Makefile runs `patchbox config`
    src = tmp_path / "src"
    src.mkdir()
    for name, text in FILES.items():
        (src / name).write_text(text)
    (src / "Makefile").write_text(MAKEFILE)
    subprocess.run(["make", "-s"], cwd=src, check=True, capture_output=True)
    diff = ""
    for name, text in FIXED.items():
        (tmp_path / name).write_text(text)
        proc = subprocess.run(
            ["diff", "-u", "--label", f"a/{name}", "--label", f"b/{name}", str(src / name)]
            + [str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=False,
        )
        diff += proc.stdout
    (tmp_path / "fix.patch").write_text(diff)
    return BuildRequest(
        source=src,
        diff=tmp_path / "fix.patch",
        binary=Path("prog"),
        output=tmp_path / "fix.pbx",
        work=tmp_path / "work",
    )


def test_check_finds_the_reference_and_reads_the_diff(request_: BuildRequest) -> None:
    checked = check(request_)
    assert checked.reference == request_.source / "prog"
    assert "+++ b/a.c" in checked.diff_text
    bad = dataclasses.replace(request_, binary=Path("nowhere"))
    with pytest.raises(BuildError, match="binary .*nowhere not found"):
        check(bad)


def test_rebuild_returns_both_object_sets(request_: BuildRequest) -> None:
    checked = check(request_)
    with workspace(request_, checked) as tree:
        assert isinstance(tree, Workspace) and not isinstance(tree, IncrementalBuild)
        rebuilt = rebuild(request_, tree)
    assert sorted(rebuilt.original) == sorted(rebuilt.patched) == ["a.o", "b.o", "main.o"]
    assert rebuilt.level == 1 and [s for s, _t in rebuilt.steps] == ["builds"]
    assert rebuilt.recompiled is None and rebuilt.notes == ()


def test_compare_decides_and_its_values_are_frozen(request_: BuildRequest) -> None:
    checked = check(request_)
    with workspace(request_, checked) as tree:
        rebuilt = rebuild(request_, tree)
        with Binary(checked.reference) as ref:
            comparison = compare(request_, checked, rebuilt, ref)
    by = {d.rel: d for d in comparison.diffs}
    assert sorted(by) == ["a.o", "b.o"] and comparison.identical == 1
    got = {(x.symbol, x.what, x.verdict) for x in by["a.o"].decisions}
    assert got == {
        ("a", ItemKind.FUNCTION, Verdict.IN),
        ("a_new", ItemKind.FUNCTION, Verdict.CARRIED),
    }
    assert by["a.o"].functions == ("a",) and by["a.o"].new_globals == {"a_new"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        by["a.o"].decisions[0].verdict = Verdict.OUT  # type: ignore[misc]  # assigning to a frozen field is the test


def test_plan_is_derived_and_compare_left_as_it_was(request_: BuildRequest) -> None:
    """Planned against a binary without b's symbol (as when b is inlined into every
    caller), the changed b is carried, not replaced; compare's decision stays."""
    checked = check(request_)
    with workspace(request_, checked) as tree:
        rebuilt = rebuild(request_, tree)
        with Binary(checked.reference) as ref:
            comparison = compare(request_, checked, rebuilt, ref)
            planned = plan(comparison, ref)
        stripped = request_.source / "prog-no-b"
        subprocess.run(
            ["objcopy", "--strip-symbol=b", str(checked.reference), str(stripped)], check=True
        )
        with Binary(stripped) as ref:
            without_b = plan(comparison, ref)
    parts = {p.diff.rel: p for p in planned.objects}
    assert parts["a.o"].replace == ("a",) and parts["b.o"].replace == ("b",)
    assert [p.diff.rel for p in planned.contributing] == ["a.o", "b.o"]
    moved = {p.diff.rel: p for p in without_b.objects}["b.o"]
    assert moved.replace == () and moved.inlined_away == ("b",) and "b" in moved.copies
    [b] = [x for x in moved.decisions if x.symbol == "b"]
    assert b.verdict is Verdict.CARRIED and "no out-of-line copy" in b.reason
    # compare's decision is what compare made
    [orig] = [x for x in moved.diff.decisions if x.symbol == "b"]
    assert orig.verdict is Verdict.IN and "no out-of-line copy" not in orig.reason
    assert "carried  function b" in explain(without_b, check(request_).diff_text)


def test_extract_and_write(request_: BuildRequest) -> None:
    checked = check(request_)
    with workspace(request_, checked) as tree:
        rebuilt = rebuild(request_, tree)
        with Binary(checked.reference.absolute()) as ref:
            planned = plan(compare(request_, checked, rebuilt, ref), ref)
            extracted = extract(planned, ref, name="fix", meta={"diff": "fix.patch"})
    patch = extracted.patch
    assert [f.symbol for f in patch.functions] == ["a", "b"]
    assert extracted.objects == ("a.o", "b.o")
    assert patch.meta["objects"] == "a.o,b.o" and patch.meta["diff"] == "fix.patch"
    assert patch.meta["new:a_new"] == "text"  # b's call to a.c's new global: copied
    assert request_.output is not None
    assert write(patch, request_.output) == request_.output
    assert load_patch(request_.output).text == patch.text


def test_nothing_to_replace_is_refused_before_the_binary_is_read() -> None:
    with pytest.raises(ExtractError, match=re.escape(NO_FUNCTION)):
        refuse(Plan(()))
    with pytest.raises(ExtractError, match=re.escape(NO_FUNCTION)):
        patch_from_diffs(Comparison(()).diffs, "/nonexistent")


def test_build_patch_runs_every_pass_in_order(request_: BuildRequest) -> None:
    seen: list[str] = []
    warnings: list[str] = []
    result = build_patch(request_, warnings=warnings, on_pass=lambda n, _v: seen.append(n))
    assert seen == ["check", "rebuild", "compare", "plan", "extract", "write"]
    assert [t.name for t in result.timings] == seen
    assert result.written == request_.output and result.written is not None
    assert result.patch is not None
    assert isinstance(result.rebuilt, Rebuilt) and warnings == list(result.warnings)
    assert [f.symbol for f in load_patch(result.written).functions] == ["a", "b"]


def test_dry_run_stops_after_the_plan(request_: BuildRequest) -> None:
    dry = dataclasses.replace(request_, dry_run=True)
    seen: list[str] = []
    result = build_patch(dry, on_pass=lambda n, _v: seen.append(n))
    assert seen == ["check", "rebuild", "compare", "plan"]
    assert result.patch is None and result.written is None
    assert request_.output is not None and not request_.output.exists()


def test_modes_exclude_each_other(request_: BuildRequest, tmp_path: Path) -> None:
    both = dataclasses.replace(request_, build_cmd="make", build_dir=tmp_path)
    with pytest.raises(BuildError, match="exclude each other"):
        workspace(both, check(both))
