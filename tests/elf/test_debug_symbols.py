"""Stripped reference binaries: symbols from a separate debug file (.gnu_debuglink, the
build-id path) or from an unstripped build of the same source (--symbols)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from patchbox.elf.binary import Binary
from patchbox.elf.buildid import read_build_id
from patchbox.errors import ElfError
from patchbox.extract import extract_patch
from patchbox.flags import PATCH_CFLAGS

SRC = """
__attribute__((noinline)) int work(int x) { return x * 3 + 1; }
int main(int argc, char **argv) { (void)argv; return work(argc); }
"""


def build(tmp: Path, src: str, name: str) -> Path:
    (tmp / f"{name}.c").write_text(src)
    out = tmp / name
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-g",
            "-fPIE",
            "-pie",
            *PATCH_CFLAGS,
            "-Wl,--build-id",
            str(tmp / f"{name}.c"),
            "-o",
            str(out),
        ],
        check=True,
    )
    return out


@pytest.fixture()
def stripped(tmp_path: Path) -> tuple[Path, Path]:
    """Returns (stripped binary, its unstripped twin)."""
    full = build(tmp_path, SRC, "prog")
    twin = tmp_path / "prog.unstripped"
    shutil.copy(full, twin)
    subprocess.run(["strip", "--strip-all", str(full)], check=True)
    return full, twin


def test_debuglink_beside_the_binary(stripped: tuple[Path, Path], tmp_path: Path) -> None:
    prog, twin = stripped
    debug = tmp_path / "prog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(twin), str(debug)], check=True)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(prog)], cwd=tmp_path, check=True)
    with Binary(prog) as b:
        assert b.symbols_path == debug
        work = b.get_symbol("work")
        assert b.read(work.address - 6, 8) == b"\x90" * 8  # bytes from the stripped binary


def test_build_id_path(
    stripped: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog, twin = stripped
    bid = read_build_id(prog)
    assert bid is not None
    where = tmp_path / "debugroot" / ".build-id" / bid[:1].hex() / f"{bid[1:].hex()}.debug"
    where.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(twin), str(where)], check=True)
    monkeypatch.setenv("PATCHBOX_DEBUG_ROOT", str(tmp_path / "debugroot"))
    with Binary(prog) as b:
        assert b.symbols_path == where and b.find_symbol("work") is not None


def test_no_debug_file_names_where_it_looked(
    stripped: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATCHBOX_DEBUG_ROOT", str(tmp_path / "nothing"))
    with pytest.raises(ElfError, match=r"stripped .*\.build-id/.*give the unstripped build"):
        Binary(stripped[0])


def test_unstripped_twin_and_a_wrong_one(stripped: tuple[Path, Path], tmp_path: Path) -> None:
    prog, twin = stripped
    with Binary(prog, symbols=twin) as b:
        assert b.symbols_path == twin
    other = build(tmp_path, SRC.replace("x * 3", "x * 5"), "other")
    with pytest.raises(ElfError, match="is not a build of"):
        Binary(prog, symbols=other)


def test_rebuild_elsewhere_matched_by_loaded_bytes(tmp_path: Path) -> None:
    """A rebuild in another directory has other debug sections, so another build-id, but the
    same loaded bytes: its symbols are accepted, the match recorded in the patch's meta,
    and the patch still names the running binary's build-id. One changed byte of a loaded
    section is refused, naming the section and the offset."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    prog = build(tmp_path / "a", SRC, "prog")
    rebuild = build(tmp_path / "b", SRC, "prog")
    assert read_build_id(prog) != read_build_id(rebuild)
    subprocess.run(["strip", "--strip-all", str(prog)], check=True)
    with Binary(prog, symbols=rebuild) as b:
        assert b.symbols_path == rebuild
        assert b.symbols_match.how == "loaded-bytes" and b.symbols_match.sections > 5
        work = b.get_symbol("work")
    fixed = tmp_path / "fix"
    fixed.mkdir()
    (fixed / "prog.c").write_text(SRC.replace("x * 3 + 1", "x * 3 + 2"))
    obj = fixed / "prog.o"
    subprocess.run(
        ["gcc", "-O2", "-fPIE", *PATCH_CFLAGS, "-c", str(fixed / "prog.c"), "-o", str(obj)],
        check=True,
    )
    patch = extract_patch(obj, prog, ["work"], name="fix", symbols=rebuild)
    assert patch.build_id == read_build_id(prog)
    assert patch.meta["symbols_match"] == "loaded-bytes"
    rebuild_id = read_build_id(rebuild)
    assert rebuild_id is not None and patch.meta["symbols_build_id"] == rebuild_id.hex()

    # One byte of work's code changed in the rebuild: refused, naming .text and the offset.
    from elftools.elf.elffile import ELFFile

    with open(rebuild, "rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        assert text is not None
        at = work.address + 3 - text["sh_addr"]
        file_off = text["sh_offset"] + at
    raw = bytearray(rebuild.read_bytes())
    raw[file_off] ^= 0xFF
    rebuild.write_bytes(bytes(raw))
    with pytest.raises(ElfError, match=rf"section \.text differs at offset {at:#x}"):
        Binary(prog, symbols=rebuild)


def test_extract_patch_against_stripped_binary(stripped: tuple[Path, Path], tmp_path: Path) -> None:
    prog, twin = stripped
    fixed = tmp_path / "fix"
    fixed.mkdir()
    (fixed / "prog.c").write_text(SRC.replace("x * 3 + 1", "x * 3 + 2"))
    obj = fixed / "prog.o"
    subprocess.run(
        ["gcc", "-O2", "-fPIE", *PATCH_CFLAGS, "-c", str(fixed / "prog.c"), "-o", str(obj)],
        check=True,
    )
    patch = extract_patch(obj, prog, ["work"], name="fix", symbols=twin)
    assert [f.symbol for f in patch.functions] == ["work"]
    assert patch.build_id == read_build_id(prog)
    assert os.path.getsize(prog) < os.path.getsize(twin)


def test_import_nobody_defines_refused_at_build(tmp_path: Path) -> None:
    """A call to a function neither the program nor its libraries define (QEMU: a new trace
    point whose generated code was not regenerated) is refused when the patch is built."""
    from patchbox.errors import ExtractError

    prog = build(tmp_path, "#include <stdio.h>\n" + SRC, "prog")
    fixed = tmp_path / "fix"
    fixed.mkdir()
    for callee, ok in (('puts("x")', True), ("trace_new_event(x)", False)):
        decl = "int trace_new_event(int);\n#include <stdio.h>\n"
        (fixed / "prog.c").write_text(
            decl + SRC.replace("return x * 3 + 1;", f"{callee}; return x * 3 + 2;")
        )
        obj = fixed / "prog.o"
        subprocess.run(
            ["gcc", "-O2", "-fPIE", *PATCH_CFLAGS, "-c", str(fixed / "prog.c"), "-o", str(obj)],
            check=True,
        )
        if ok:
            extract_patch(obj, prog, ["work"], name="fix")
        else:
            with pytest.raises(ExtractError, match="the new code uses trace_new_event"):
                extract_patch(obj, prog, ["work"], name="fix")
