"""Thread-local variables reached from live patches (tier 2: `-m process`).

The program (tests/e2e/tlstree) runs four worker threads; each calls the executable's
``step()`` and the dlopened library's ``lib_step()`` in a loop, counting its calls in a
local variable, and each function adds 1 to every counter of the calling thread:
local-exec, initial-exec (by attribute and through ``extern``) and a static one in the
executable; general-dynamic and local-dynamic (a static) in the library. On ``report``
every worker copies its counters and its own count of calls between two calls.

A fix adds 1 to one more thread-local variable (``seen``, ``lib_seen``), which only the
fix touches. Built by ``extract-patch`` and by ``patchbox build`` from a diff, it is
applied and removed while the threads run: in every thread, every counter equals that
thread's calls before, while and after (the patched code touches the same per-thread
variables the old code did: nothing resets, nothing is lost, no thread counts in
another's), and the fix's own counter grows only while it is applied.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from live import Target
from tlslive import EXE, EXE_FIX, LIB, LIB_FIX, TREE, check_exact, live_cycle, report

from helpers import run_with_tools
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.process
run = run_with_tools


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> Path:
    """Returns the built program's tree."""
    src = tmp_path_factory.mktemp("tls") / "src"
    shutil.copytree(TREE, src)
    run("make", cwd=src)
    return src


@pytest.fixture()
def target(tree: Path) -> Iterator[Target]:
    t = Target(tree / "app")
    yield t
    alive = t.alive()
    t.stop()
    assert alive, f"the program died: {t.stderr_text}"


def fixed_object(tree: Path, tmp_path: Path, name: str, fix: tuple[str, str], *flags: str) -> Path:
    """Returns the object of ``name``.c with ``fix``, compiled as the tree compiles it."""
    d = tmp_path / "fixed"
    d.mkdir(exist_ok=True)
    src = (tree / f"{name}.c").read_text()
    assert fix[0] in src
    (d / f"{name}.c").write_text(src.replace(*fix))
    shutil.copy(tree / "counters.h", d)
    cflags = run("patchbox", "config", "--cflags").stdout.split()
    out = d / f"{name}.o"
    run("gcc", "-O2", "-g", *flags, *cflags, "-c", d / f"{name}.c", "-o", out)
    return out


def diff_of(tree: Path, tmp_path: Path, name: str, fix: tuple[str, str]) -> Path:
    """Returns a unified diff (-p1) of ``fix`` to ``name``.c."""
    a = (tree / f"{name}.c").read_text()
    (tmp_path / "new.c").write_text(a.replace(*fix))
    proc = run(
        "diff",
        "-u",
        "--label",
        f"a/{name}.c",
        "--label",
        f"b/{name}.c",
        tree / f"{name}.c",
        tmp_path / "new.c",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    out = tmp_path / "fix.patch"
    out.write_text(proc.stdout)
    return out


def test_executable_fix_by_extract_patch(tree: Path, target: Target, tmp_path: Path) -> None:
    obj = fixed_object(tree, tmp_path, "counters", EXE_FIX, "-fPIE")
    pbx = tmp_path / "exe.pbx"
    run("extract-patch", "-f", "step", "--name", "tlsexe", "-o", pbx, obj, tree / "app")
    meta = load_patch(pbx).meta
    assert meta["tls:le_count"].startswith("local-exec: TP offset -")
    assert meta["tls:st_count"].startswith("local-exec: TP offset -")
    assert meta["tls:seen"].startswith("local-exec: TP offset -")
    assert meta["tls:ie_count"].startswith("initial-exec: TP offset -")
    assert meta["tls:ext_count"].startswith("initial-exec: TP offset -")
    live_cycle(target, pbx, "tlsexe", EXE)
    check_exact(report(target), LIB)  # the library's counters ran all along


def test_executable_fix_by_patchbox_build(tree: Path, target: Target, tmp_path: Path) -> None:
    diff = diff_of(tree, tmp_path, "counters", EXE_FIX)
    pbx = tmp_path / "exe.pbx"
    out = run(
        "patchbox", "build", "--source", tree, "--diff", diff, "--binary", "app", "--explain",
        "--name", "tlsexe", "-o", pbx,
    ).stdout  # fmt: skip
    assert "in       function step" in out
    assert [f.symbol for f in load_patch(pbx).functions] == ["step"]
    live_cycle(target, pbx, "tlsexe", EXE)


def test_library_fix_by_extract_patch(tree: Path, target: Target, tmp_path: Path) -> None:
    obj = fixed_object(tree, tmp_path, "lcount", LIB_FIX, "-fPIC")
    pbx = tmp_path / "lib.pbx"
    lib = tree / "liblcount.so"
    run("extract-patch", "-f", "lib_step", "--name", "tlslib", "-o", pbx, obj, lib)
    meta = load_patch(pbx).meta
    assert meta["tls:lib_g"].startswith("general-dynamic: GOT pair")
    assert meta["tls:lib_seen"].startswith("general-dynamic: GOT pair")
    assert meta["tls:lib_s"].startswith("local-dynamic: GOT pair {module id, 0}")
    live_cycle(target, pbx, "tlslib", LIB)
    check_exact(report(target), EXE)


def test_library_fix_by_patchbox_build(tree: Path, target: Target, tmp_path: Path) -> None:
    diff = diff_of(tree, tmp_path, "lcount", LIB_FIX)
    pbx = tmp_path / "lib.pbx"
    out = run(
        "patchbox", "build", "--source", tree, "--diff", diff, "--binary", "liblcount.so",
        "--explain", "--name", "tlslib", "-o", pbx,
    ).stdout  # fmt: skip
    assert "in       function lib_step" in out
    assert [f.symbol for f in load_patch(pbx).functions] == ["lib_step"]
    live_cycle(target, pbx, "tlslib", LIB)


@pytest.mark.parametrize(
    ("libflags", "how"),
    [
        ("-ftls-model=initial-exec", "initial-exec: GOT slot (R_X86_64_TPOFF64)"),
        ("-mtls-dialect=gnu2", "general-dynamic through a descriptor: "),
    ],
    ids=["initial-exec", "descriptors"],
)
def test_library_built_with_other_models(tmp_path: Path, libflags: str, how: str) -> None:
    """The library's variables reached through its TPOFF64 slots (a dlopened library in
    the static TLS block) or through its TLS descriptors: the patch calls the loader's
    resolver through the library's own descriptor."""
    tree = tmp_path / "src"
    shutil.copytree(TREE, tree)
    run("make", f"LIBFLAGS={libflags}", cwd=tree)
    obj = fixed_object(tree, tmp_path, "lcount", LIB_FIX, "-fPIC", libflags)
    pbx = tmp_path / "lib.pbx"
    run(
        "extract-patch", "-f", "lib_step", "--name", "tlslib", "-o", pbx, obj, tree / "liblcount.so"
    )
    meta = load_patch(pbx).meta
    assert all(meta[f"tls:{v}"].startswith(how) for v in ("lib_g", "lib_s", "lib_seen")), meta
    t = Target(tree / "app")
    try:
        live_cycle(t, pbx, "tlslib", LIB)
        check_exact(report(t), EXE)
        alive = t.alive()
    finally:
        t.stop()
    assert alive, t.stderr_text
