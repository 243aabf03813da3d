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
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from live import Target

from helpers import run_with_tools
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.process
BIN = Path(sys.executable).parent
TREE = Path(__file__).resolve().parent / "tlstree"
THREADS = 4
# The fixes: one more thread-local counter, touched only by the patched code.
EXE_FIX = ("\text_count += 1;\n}", "\text_count += 1;\n\tseen += 1;\n}")
LIB_FIX = ("\tlib_s += 1;\n}", "\tlib_s += 1;\n\tlib_seen += 1;\n}")


run = run_with_tools


@dataclass(frozen=True)
class Counts:
    """One worker's report: the executable's counters and calls, the library's."""

    le: int
    ie: int
    st: int
    ext: int
    seen: int
    calls: int
    lib_g: int
    lib_s: int
    lib_seen: int
    lib_calls: int


@dataclass(frozen=True)
class Side:
    """The counters of one binary: those every call bumps, the fix's, the calls."""

    counters: tuple[str, ...]
    marker: str
    calls: str


EXE = Side(("le", "ie", "st", "ext"), "seen", "calls")
LIB = Side(("lib_g", "lib_s"), "lib_seen", "lib_calls")


def report(t: Target) -> list[Counts]:
    """Returns every worker's counters, as it copied them between two calls."""
    line = t.call("report")
    rows = [Counts(*map(int, part.split(","))) for part in line.split()]
    assert len(rows) == THREADS and len(fields(Counts)) == 10, line
    return rows


def check_exact(rows: list[Counts], side: Side) -> None:
    """Every counter of every thread equals that thread's own calls."""
    for i, r in enumerate(rows):
        calls = getattr(r, side.calls)
        assert calls > 0, (i, r)
        assert all(getattr(r, c) == calls for c in side.counters), (i, r)


def report_when(
    t: Target, ready: Callable[[list[Counts]], bool], timeout: float = 10
) -> list[Counts]:
    """Returns the first report (one every 0.1 s) that satisfies ``ready``, so a loaded
    machine only makes the test slower."""
    deadline = time.monotonic() + timeout
    while True:
        rows = report(t)
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def live_cycle(target: Target, patch: Path, name: str, side: Side) -> None:
    """Applies and removes ``patch`` while the workers run; checks the counts."""
    before = report_when(target, lambda rows: all(getattr(r, side.calls) for r in rows))
    check_exact(before, side)
    assert all(getattr(r, side.marker) == 0 for r in before)

    run("patchbox", "apply", "-p", target.pid, patch)
    during = report_when(target, lambda rows: all(getattr(r, side.marker) for r in rows))
    check_exact(during, side)  # the same per-thread variables: nothing reset or lost
    for b, d in zip(before, during):
        ran = getattr(d, side.calls) - getattr(b, side.calls)
        assert ran > 0
        # Every thread ran the fix, only since it was applied.
        assert 0 < getattr(d, side.marker) <= ran, (b, d)

    run("patchbox", "remove", "-p", target.pid, name)
    removed = report(target)
    later = report_when(
        target,
        lambda rows: all(
            getattr(lt, side.calls) > getattr(r, side.calls) for r, lt in zip(removed, rows)
        ),
    )
    check_exact(removed, side)
    check_exact(later, side)
    for r, lt in zip(removed, later):
        assert getattr(lt, side.calls) > getattr(r, side.calls)
        assert getattr(lt, side.marker) == getattr(r, side.marker)  # the old code again


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
        ("-mtls-dialect=gnu2", "general-dynamic through a descriptor (-mtls-dialect=gnu2): "),
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
