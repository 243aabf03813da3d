"""Static symbols of two source files of one basename in different directories (QEMU's
``net/vhost-vdpa.c`` and ``hw/virtio/vhost-vdpa.c``): ``.symtab``'s STT_FILE names
both ``util.c``; :meth:`Binary.match_source` tells which group is which object's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from patchbox.compare.objects import other_programs
from patchbox.elf import dwarf
from patchbox.elf.binary import Binary
from patchbox.elf.fastread import load_object
from patchbox.errors import ExtractError
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS

A_UTIL = """\
static int count = 100;
static int only_a;
__attribute__((noinline)) static int helper(int x)
{
    __asm__ volatile("");
    count += 1;
    only_a += x;
    return x + 1;
}
int a_value(int x) { return helper(x) * 10; }
"""
B_UTIL = """\
static int count = 200;
__attribute__((noinline)) static int helper(int x)
{
    __asm__ volatile("");
    count += 1;
    return x * 2;
}
int b_value(int x) { return helper(x) + 1; }
"""
C_UTIL = """\
static int count = 300; /* the only static of c/util.c: no function to place it by */
int c_value(void) { return count++; }
"""
MAIN = """\
int a_value(int); int b_value(int); int c_value(void);
int main(void) { return a_value(1) + b_value(2) + c_value(); }
"""
FILES = {"a/util.c": A_UTIL, "b/util.c": B_UTIL, "c/util.c": C_UTIL, "main.c": MAIN}


def make_tree(root: Path, files: dict[str, str], debug: bool) -> Path:
    """Returns the executable of ``files`` compiled in ``root`` as make compiles them
    (``cc -c a/util.c -o a/util.o`` from the top) and linked."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    flags = ["-O2", "-fPIE", *PATCH_CFLAGS, *(["-g"] if debug else [])]
    objs = []
    for name in files:
        obj = name[:-2] + ".o"
        subprocess.run(["gcc", *flags, "-c", name, "-o", obj], cwd=root, check=True)
        objs.append(obj)
    subprocess.run(["gcc", "-pie", *objs, "-o", "app", *LINK_FLAGS], cwd=root, check=True)
    return root / "app"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("same") / "src"
    make_tree(root, FILES, debug=True)
    return root


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree built without -g: no DWARF in objects or binary."""
    root = tmp_path_factory.mktemp("plain") / "src"
    make_tree(root, FILES, debug=False)
    return root


def _units(b: Binary, name: str) -> list[int]:
    return sorted({s.unit for s in b.iter_symbols() if s.is_local and s.name == name})


def test_symtab_names_basenames_only(tree: Path) -> None:
    with Binary(tree / "app") as b:
        helpers = [s for s in b.iter_symbols() if s.name == "helper"]
        assert [s.source_file for s in helpers] == ["util.c", "util.c"]
        assert helpers[0].unit != helpers[1].unit
        with pytest.raises(ExtractError, match="ambiguous") as err:
            b.find_symbol("helper", "util.c", local=True)
        # the refusal names both files by their full paths (the binary's DWARF)
        assert f"{tree}/a/util.c at " in str(err.value)
        assert f"{tree}/b/util.c at " in str(err.value)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_dwarf_paths_tell_units_apart(tree: Path, name: str) -> None:
    obj = load_object(tree / name / "util.o")
    assert dwarf.object_source_path(obj.path) == f"{tree}/{name}/util.c"
    with Binary(tree / "app") as b:
        match = b.match_source(obj)
        assert match is not None and match.how == "dwarf" and len(match.units) == 1
        assert b.unit_paths(match.units) == {match.units[0]: f"{tree}/{name}/util.c"}
        count = b.find_symbol("count", match, local=True)
        assert count is not None and count.unit == match.units[0]
        init = {"a": 100, "b": 200, "c": 300}[name]
        assert b.read(count.address, 4) == init.to_bytes(4, "little")
        helper = b.find_symbol("helper", match, local=True)
        if name == "c":
            assert helper is None  # c/util.c has none: the others' never match
        else:
            assert helper is not None and helper.unit == match.units[0]


def test_data_only_unit_placed_without_aranges(tree: Path, tmp_path: Path) -> None:
    """Without .debug_aranges, functions are placed by their DW_AT_low_pc and variables
    by their DW_OP_addr location (c/util.c's unit holds one variable only)."""
    exe = tmp_path / "app"
    subprocess.run(
        ["objcopy", "--remove-section=.debug_aranges", str(tree / "app"), str(exe)], check=True
    )
    with Binary(exe) as b:
        assert b.dwarf.get_section_by_name(".debug_aranges") is None
        units = _units(b, "count")
        assert sorted(b.unit_paths(units).values()) == [
            f"{tree}/{d}/util.c" for d in ("a", "b", "c")
        ]


def test_copy_of_the_tree_elsewhere(tree: Path, tmp_path: Path) -> None:
    """An object built in another checkout (patchbox build's WORK/tree) is the unit whose
    path ends in the same directories."""
    copy = tmp_path / "elsewhere" / "tree"
    shutil.copytree(tree, copy)
    (copy / "b" / "util.o").unlink()
    subprocess.run(
        ["gcc", "-O2", "-fPIE", "-g", *PATCH_CFLAGS, "-c", "b/util.c", "-o", "b/util.o"],
        cwd=copy,
        check=True,
    )
    with Binary(tree / "app") as b:
        match = b.match_source(load_object(copy / "b" / "util.o"))
        assert match is not None and match.how == "dwarf"
        assert match.path == f"{copy}/b/util.c"
        assert b.unit_paths(match.units) == {match.units[0]: f"{tree}/b/util.c"}


def test_basename_alone_does_not_decide(tree: Path, tmp_path: Path) -> None:
    """An object compiled from a directory of another layout matches every unit of its
    name equally: a static both define is refused, naming both full paths; one only one
    of them defines still resolves."""
    other = tmp_path / "x" / "util.c"
    other.parent.mkdir()
    other.write_text(A_UTIL)
    obj = other.with_suffix(".o")
    subprocess.run(
        ["gcc", "-O2", "-fPIE", "-g", *PATCH_CFLAGS, "-c", "util.c", "-o", obj.name],
        cwd=other.parent,
        check=True,
    )
    with Binary(tree / "app") as b:
        match = b.match_source(load_object(obj))
        assert match is not None and match.how == "undecided" and len(match.units) == 3
        with pytest.raises(ExtractError) as err:
            b.find_symbol("helper", match, local=True)
        text = str(err.value)
        assert f"static 'helper' of {other} is ambiguous" in text
        assert f"{tree}/a/util.c at " in text and f"{tree}/b/util.c at " in text
        assert "matches none of them better" in text
        only = b.find_symbol("only_a", match, local=True)
        assert only is not None and b.unit_paths(match.units)[only.unit] == f"{tree}/a/util.c"


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_without_dwarf_the_original_object_decides(plain: Path, name: str) -> None:
    """No debug info anywhere: the object of the build that linked the binary is the one
    unit whose statics it has with the same sizes and bytes."""
    obj = load_object(plain / name / "util.o")
    assert dwarf.object_source_path(obj.path) is None
    with Binary(plain / "app") as b:
        alone = b.match_source(obj)
        assert alone is not None and alone.how == "undecided" and alone.path is None
        with pytest.raises(ExtractError, match="compile it with -g"):
            b.find_symbol("count", alone, local=True)
        match = b.match_source(obj, original=obj)
        assert match is not None and match.how == "symbols" and len(match.units) == 1
        count = b.find_symbol("count", match, local=True)
        init = {"a": 100, "b": 200, "c": 300}[name]
        assert count is not None and b.read(count.address, 4) == init.to_bytes(4, "little")


def test_without_dwarf_identical_statics_stay_undecided(tmp_path: Path) -> None:
    """Two files whose statics are the same bytes cannot be told apart without debug
    info: the lookup is refused rather than guessed."""
    same = B_UTIL.replace("b_value", "a_value")
    exe = make_tree(tmp_path, {**FILES, "a/util.c": same}, debug=False)
    obj = load_object(tmp_path / "a" / "util.o")
    with Binary(exe) as b:
        match = b.match_source(obj, original=obj)
        assert match is not None and match.how == "undecided" and len(match.units) == 3
        with pytest.raises(ExtractError, match="util.c at 0x.*util.c at 0x"):
            b.find_symbol("helper", match, local=True)


@pytest.mark.parametrize("fixture", ["tree", "plain"])
def test_other_programs_keeps_both(fixture: str, request: pytest.FixtureRequest) -> None:
    """Two objects of one basename linked into the binary are both the binary's (the
    check for sources compiled twice compares each with its own statics)."""
    root: Path = request.getfixturevalue(fixture)
    objects = {f"{d}/util.o": root / d / "util.o" for d in ("a", "b", "c")}
    with Binary(root / "app") as b:
        assert other_programs(objects, b) == set()
