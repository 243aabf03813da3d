"""Thread-local variables of an aarch64 shared library reached from live patches, under
qemu-user (tier `aarch64`; docs/aarch64.md).

tests/e2e/tlstree cross-built for aarch64 (`patchbox config --arch aarch64`): four
worker threads each call the executable's ``step()`` and the dlopened library's
``lib_step()``, counting in thread-local variables (test_tls_live.py says how). The
library is built in each of the three ways GCC reaches a library's thread-local
variables on aarch64: descriptors (its default for ``-fPIC``), the traditional
``__tls_get_addr`` pairs (``-mtls-dialect=trad``) and initial-exec. The fix of
``lib_step`` is built by ``extract-patch`` from the fixed object and the library, applied
and removed through this x86-64 client while the threads run; every thread's counters
equal its own calls before, while and after, and the fix's counter grows only while it
is applied: the patch reaches the very per-thread variables of the running library,
through the library's own descriptors, GOT pairs or slots.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from a64 import CC, LOADER, QEMU, missing_toolchain
from live import Target
from tlslive import EXE, LIB, LIB_FIX, TREE, check_exact, live_cycle, report

from helpers import run_with_tools as run
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.aarch64

MODELS = [
    pytest.param("", "general-dynamic through a descriptor: descriptor (R_AARCH64_TLSDESC) at ",
                 id="descriptors"),
    pytest.param("-mtls-dialect=trad", "general-dynamic: GOT pair (R_AARCH64_TLS_DTPMOD) at ",
                 id="tls_get_addr"),
    pytest.param("-ftls-model=initial-exec", "initial-exec: GOT slot (R_AARCH64_TLS_TPREL) at ",
                 id="initial-exec"),
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def toolchain() -> None:
    gone = missing_toolchain()
    if gone:
        pytest.skip(f"missing: {gone}")


def build(tree: Path, libflags: str) -> None:
    """Cross-builds the tree with the aarch64 agent and flags of `patchbox config`."""
    cflags = run("patchbox", "config", "--arch", "aarch64", "--cflags").stdout.strip()
    libs = run(
        "patchbox", "config", "--arch", "aarch64", "--libs", "--app-version", "tls-a64"
    ).stdout.strip()
    run(
        "make", f"CC={CC}", f"PBX_CFLAGS={cflags}", f"LDLIBS={libs} {shlex.join(LOADER)}",
        f"LIBFLAGS={libflags}", cwd=tree,
    )  # fmt: skip


def fixed_object(tree: Path, out: Path, libflags: str) -> Path:
    """Returns the library's object with the fix, compiled as the tree compiles it."""
    out.mkdir()
    src = (tree / "lcount.c").read_text()
    assert LIB_FIX[0] in src
    (out / "lcount.c").write_text(src.replace(*LIB_FIX))
    shutil.copy(tree / "counters.h", out)
    cflags = run("patchbox", "config", "--arch", "aarch64", "--cflags").stdout.split()
    obj = out / "lcount.o"
    run(CC, "-O2", "-g", "-fPIC", *libflags.split(), *cflags, "-c", out / "lcount.c", "-o", obj)
    return obj


@pytest.fixture()
def started() -> Iterator[list[Target]]:
    """Collects the programs a test starts; stops them, failing if one died."""
    targets: list[Target] = []
    yield targets
    for t in targets:
        alive = t.alive()
        t.stop()
        assert alive, f"the program died: {t.stderr_text}"


@pytest.mark.parametrize(("libflags", "how"), MODELS)
def test_library_thread_locals_patched_live(
    tmp_path: Path, started: list[Target], libflags: str, how: str
) -> None:
    tree = tmp_path / "src"
    shutil.copytree(TREE, tree)
    build(tree, libflags)
    obj = fixed_object(tree, tmp_path / "fixed", libflags)
    pbx = tmp_path / "lib.pbx"
    lib = tree / "liblcount.so"
    run("extract-patch", "-f", "lib_step", "--name", "tlslib", "-o", pbx, obj, lib)
    meta = load_patch(pbx).meta
    assert all(meta[f"tls:{v}"].startswith(how) for v in ("lib_g", "lib_s", "lib_seen")), meta

    target = Target(tree / "app", argv=[QEMU, str(tree / "app")])
    started.append(target)
    live_cycle(target, pbx, "tlslib", LIB)
    check_exact(report(target), EXE)  # the executable's counters ran all along
