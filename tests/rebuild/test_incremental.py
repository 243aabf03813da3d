"""`patchbox build --build-dir`: remapping recorded compile commands onto a patched copy
(a tiny meson-like layout: src/ with two C files and a header, build/ beside it with a
compile_commands.json using ../src-relative and absolute paths, compiled on the fly)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from patchbox.compare.objects import compare_trees
from patchbox.elf.binary import Binary
from patchbox.elf.fastread import load_object
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS
from patchbox.format.layout import load_patch
from patchbox.profiles import get_profile
from patchbox.rebuild.incremental import IncrementalBuild, Remap

HDR = "#define SCALE 3\nstatic inline int scaled(int x) { return x * SCALE; }\n"
A = (
    '#include <stdio.h>\n#include "common.h"\n'
    'int a_fn(int x) { if (x < 0) __builtin_printf("%s:%d\\n", __FILE__, __LINE__); '
    "return scaled(x) + 1; }\n"
)
B = (
    '#include "common.h"\nint a_fn(int);\n'
    "int b_fn(int x) { return scaled(x) - 1; }\n"
    "int main(int argc, char **argv) { (void)argv; return a_fn(argc) + b_fn(argc); }\n"
)


def layout(tmp: Path) -> tuple[Path, Path, Path]:
    src, build = tmp / "src", tmp / "build"
    (src / "inc").mkdir(parents=True)
    (src / "inc" / "common.h").write_text(HDR)
    (src / "a.c").write_text(A)
    (src / "b.c").write_text(B)
    build.mkdir()
    entries = []
    for name, inc in (("a", "-I../src/inc"), ("b", f"-iquote {src / 'inc'}")):
        out = f"prog.p/{name}.c.o"
        cmd = (
            f"gcc -O2 -g {inc} {' '.join(PATCH_CFLAGS)} -fPIE -MD -MQ {out} -MF {out}.d "
            f"-o {out} -c ../src/{name}.c"
        )
        entries.append(
            {"directory": str(build), "command": cmd, "file": f"../src/{name}.c", "output": out}
        )
    (build / "prog.p").mkdir()
    for e in entries:
        subprocess.run(shlex.split(e["command"]), cwd=build, check=True)
    (build / "compile_commands.json").write_text(json.dumps(entries))
    exe = build / "prog"
    subprocess.run(
        ["gcc", "-pie", "prog.p/a.c.o", "prog.p/b.c.o", "-o", "prog", *LINK_FLAGS],
        cwd=build,
        check=True,
    )
    return src, build, exe


def test_remap_command(tmp_path: Path) -> None:
    src, build, _exe = layout(tmp_path)
    entries = json.loads((build / "compile_commands.json").read_text())
    remap = Remap(src, tmp_path / "w" / "tree", tmp_path / "w" / "link", build)
    cmd = remap.command(entries[0], tmp_path / "out.o")
    link, tree = str(tmp_path / "w" / "link"), str(tmp_path / "w" / "tree")
    assert f"-I{link}/inc" in cmd and f"{link}/a.c" in cmd
    assert f"-ffile-prefix-map={link}=../src" in cmd
    assert cmd[-2:] == ["-o", str(tmp_path / "out.o")]
    assert not {"-MD", "-MQ", "-MF"} & set(cmd)
    cmd = remap.command(entries[1], tmp_path / "out.o")
    assert f"{tree}/inc" in cmd and f"-ffile-prefix-map={tree}={src}" in cmd
    assert "-iquote" in cmd and f"{link}/b.c" in cmd
    # Paths of the build directory and options stay as they are.
    e = dict(entries[0], command=entries[0]["command"] + " -I. -Iprog.p -DX=1")
    assert cmd_tail(remap.command(e, tmp_path / "o.o")) == ["-I.", "-Iprog.p", "-DX=1"]


def cmd_tail(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a in ("-I.", "-Iprog.p", "-DX=1")]


def diff_of(src: Path, rel: str, old: str, new: str) -> str:
    import difflib

    text = (src / rel).read_text()
    return "".join(
        difflib.unified_diff(
            text.splitlines(True), text.replace(old, new).splitlines(True), f"a/{rel}", f"b/{rel}"
        )
    )


def test_header_change_recompiles_includers(tmp_path: Path) -> None:
    src, build, exe = layout(tmp_path)
    before = {p: p.read_bytes() for p in [*src.rglob("*.[ch]"), *build.rglob("*.o")]}
    diff = tmp_path / "fix.patch"
    diff.write_text(diff_of(src, "inc/common.h", "#define SCALE 3", "#define SCALE 4"))
    with IncrementalBuild(src, build, exe, tmp_path / "work") as ws:
        ws.copy_source()
        level = ws.apply_diff(diff)
        assert level == 1
        entries = ws.affected(ws.changed_files(diff.read_text(), level))
        assert sorted(e["file"] for e in entries) == ["../src/a.c", "../src/b.c"]
        orig, patched = ws.compile(entries, 2)
        diffs, _same = compare_trees(orig, patched, get_profile("generic").reporters)
        got = {(d.rel, f) for d in diffs for f in d.functions}
        assert ("prog.p/a.c.o", "a_fn") in got and ("prog.p/b.c.o", "b_fn") in got
        # __FILE__ is spelled as in the original build.
        assert b"../src/a.c" in patched["prog.p/a.c.o"].read_bytes()
        assert (ws.tree / "a.c").is_symlink() and not (ws.tree / "inc/common.h").is_symlink()
    assert {p: p.read_bytes() for p in before} == before  # nothing of src/ or build/ written


def test_changed_header_reached_through_dotdot(tmp_path: Path) -> None:
    """inc/sub/h.h includes "../common.h": through the mirror's symlink to the original
    inc/sub, `..` is the original inc/. The dependency check sees the original read and
    the objects are compiled again from a whole mirror."""
    src, build, exe = layout(tmp_path)
    (src / "inc" / "sub").mkdir()
    (src / "inc" / "sub" / "h.h").write_text('#include "../common.h"\n')
    (src / "a.c").write_text(A.replace('"common.h"', '"sub/h.h"'))
    entries = json.loads((build / "compile_commands.json").read_text())
    subprocess.run(shlex.split(entries[0]["command"]), cwd=build, check=True)
    diff = tmp_path / "fix.patch"
    diff.write_text(diff_of(src, "inc/common.h", "#define SCALE 3", "#define SCALE 4"))
    with IncrementalBuild(src, build, exe, tmp_path / "work") as ws:
        ws.copy_source()
        assert (ws.tree / "inc").is_symlink()  # lazy: one symlink per top entry
        level = ws.apply_diff(diff)
        assert (ws.tree / "inc/sub").is_symlink() and not (ws.tree / "inc").is_symlink()
        entries = ws.affected(ws.changed_files(diff.read_text(), level))
        orig, patched = ws.compile(entries, 2)
        assert any("symlinked directory" in n for n in ws.notes), ws.notes
        assert not (ws.tree / "inc/sub").is_symlink()
        diffs, _same = compare_trees(orig, patched, get_profile("generic").reporters)
        got = {(d.rel, f) for d in diffs for f in d.functions}
        assert ("prog.p/a.c.o", "a_fn") in got and ("prog.p/b.c.o", "b_fn") in got


def test_source_change_cli(tmp_path: Path) -> None:
    src, build, exe = layout(tmp_path)
    diff = tmp_path / "fix.patch"
    # a.c only: b.c is not recompiled.
    diff.write_text(diff_of(src, "a.c", "return scaled(x) + 1;", "return scaled(x) + 2;"))
    out = tmp_path / "fix.pbx"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "patchbox"),
            "build",
            "--source",
            str(src),
            "--diff",
            str(diff),
            "--binary",
            str(exe),
            "--build-dir",
            str(build),
            "--explain",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 object(s) of" in proc.stdout
    assert "in       function a_fn" in proc.stdout
    assert "b_fn" not in proc.stdout
    assert out.is_file()


VDPA = """\
#include "vdpa.h"
static int state;
__attribute__((noinline)) static int vhost_vdpa_cleanup(int x)
{{
    __asm__ volatile("");
    state += STEP;
    return x + state;
}}
int {prefix}_vdpa(int x) {{ return vhost_vdpa_cleanup(x); }}
"""


def test_same_named_sources_of_a_build_dir(tmp_path: Path) -> None:
    """QEMU's net/vhost-vdpa.c and hw/virtio/vhost-vdpa.c in miniature (issue 21): both
    define a static vhost_vdpa_cleanup, ``.symtab`` names both files vdpa.c, and a header
    change recompiles both. Each replaces its own (told by its compile unit's path)."""
    src, build = tmp_path / "src", tmp_path / "build"
    files = {"net/vdpa.c": "net", "hw/virtio/vdpa.c": "hw"}
    (src / "inc").mkdir(parents=True)
    (src / "inc" / "vdpa.h").write_text("#define STEP 3\n")
    (src / "main.c").write_text(
        "int net_vdpa(int); int hw_vdpa(int);\n"
        "int main(int argc, char **argv) { (void)argv; return net_vdpa(argc) + hw_vdpa(1); }\n"
    )
    (build / "prog.p").mkdir(parents=True)
    entries = []
    for rel in [*files, "main.c"]:
        if rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(VDPA.format(prefix=files[rel]))
        out = f"prog.p/{rel.replace('/', '_')}.o"
        cmd = (
            f"gcc -O2 -g -I../src/inc {' '.join(PATCH_CFLAGS)} -fPIE -MD -MQ {out} -MF {out}.d "
            f"-o {out} -c ../src/{rel}"
        )
        subprocess.run(shlex.split(cmd), cwd=build, check=True)
        entries.append({"directory": str(build), "command": cmd, "file": f"../src/{rel}"})
        entries[-1]["output"] = out
    (build / "compile_commands.json").write_text(json.dumps(entries))
    objs = [e["output"] for e in entries]
    subprocess.run(["gcc", "-pie", *objs, "-o", "prog", *LINK_FLAGS], cwd=build, check=True)
    diff = tmp_path / "fix.patch"
    diff.write_text(diff_of(src, "inc/vdpa.h", "#define STEP 3", "#define STEP 4"))
    pbx = tmp_path / "fix.pbx"
    proc = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "patchbox"), "build", "--source", str(src)),
            *("--diff", str(diff), "--binary", str(build / "prog"), "--build-dir", str(build)),
            *("--explain", "-o", str(pbx)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 object(s) of" in proc.stdout
    patch = load_patch(pbx)
    with Binary(build / "prog") as b:
        want = {}
        for rel, prefix in files.items():
            obj = load_object(build / f"prog.p/{rel.replace('/', '_')}.o")
            match = b.match_source(obj)
            assert match is not None and match.how == "dwarf", match
            sym = b.find_symbol("vhost_vdpa_cleanup", match, local=True)
            assert sym is not None
            want[prefix] = sym.address
    assert len(set(want.values())) == 2
    assert sorted(f.target for f in patch.functions) == sorted(want.values())
    assert {f.symbol for f in patch.functions} == {"vhost_vdpa_cleanup"}
