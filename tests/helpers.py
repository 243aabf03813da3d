"""Test helpers: compiling C snippets on the fly, locating the built agent, acting as
nobody, the end-to-end target program, a small patch to write.

Import from here (``from helpers import compile_c``): with two conftest.py files the
module name ``conftest`` is ambiguous.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, Symbol, SymbolTableSection

from patchbox.arch import Arch, get_arch, host_arch
from patchbox.config import (
    AGENT_OBJECTS,
    agent_dir,
    build_info_object,
    collect_build_info,
    libs,
)
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS, patch_cflags
from patchbox.format.model import Fixup, Function, Patch
from patchbox.wire import FixupBase, FixupSection, FixupType

ROOT = Path(__file__).resolve().parent.parent
APP_VERSION = "e2e-1.0"
# The agent the tests link: the installed package's (or $PATCHBOX_AGENT_DIR).
AGENT_DIR = agent_dir()


# The target program of the end-to-end and Ansible tests: its @MARKERS@ as they start.
ORIGINAL = {
    "USE_HELPER": "scale(x) + 1",
    "BUMP_STEP": "1",
    "GREETING": "hello",
    "FMT": "value=%d",
    "PAIR_A": "1",
    "PAIR_B": "2",
    "STACKED": "100",
    "PICK": 'return x ? "some" : "none";',
    "EXTRA": "",
    "PARK": "return x + 7;",
}


def render(**changes: str) -> str:
    """Returns the end-to-end tests' target program (tests/e2e/target.c) with its
    @MARKERS@ filled, ORIGINAL overridden by ``changes``."""
    src = (ROOT / "tests" / "e2e" / "target.c").read_text()
    for key, value in {**ORIGINAL, **changes}.items():
        src = src.replace(f"@{key}@", value)
    return src


def compile_c(
    src: str,
    out: Path,
    *,
    obj: bool = False,
    extra: list[str] | None = None,
    agent: bool | Path = False,
    opt: str = "-O2",
    app_version: str = APP_VERSION,
    arch: str | None = None,
) -> Path:
    """Returns ``out`` after compiling C source text ``src`` with the patchable flags (and
    with ``agent``, the agent, the build-info it reports ``app_version`` in) for the
    architecture called ``arch`` (default: this host's; another one with Debian's cross
    compiler ``<multiarch>-gcc``, linked with its loader path: cross_link_flags).
    ``agent`` a directory: that directory's agent objects instead of the package's."""
    target = get_arch(arch) if arch else host_arch()
    native = target == host_arch()
    cflags = PATCH_CFLAGS if native else patch_cflags(target)
    c_file = out.with_suffix(".c")
    c_file.write_text(src)
    cc = "gcc" if native else f"{target.multiarch}-gcc"
    cmd = [cc, opt, "-fPIE", *cflags, *(extra or [])]
    if obj:
        cmd += ["-c", str(c_file), "-o", str(out)]
    else:
        # A build-id in ``extra`` (unique_build_id) wins over the default sha1 one.
        own_id = any(f.startswith("-Wl,--build-id") for f in extra or [])
        link = [f for f in LINK_FLAGS if not (own_id and f.startswith("-Wl,--build-id"))]
        cmd += ["-pie", str(c_file), "-o", str(out), *link]
        cmd += [] if native else cross_link_flags(target)
        if isinstance(agent, Path):  # an agent built for the test (its own SANDBOX_ALLOC)
            info = collect_build_info(app_version, " ".join(cflags), None, target)
            cmd += [str(agent / name) for name in AGENT_OBJECTS]
            cmd += [str(build_info_object(info, target))]
        elif agent:  # exactly what a user's build gets from `patchbox config --libs`
            flags = " ".join(cflags)
            cmd += shlex.split(libs(app_version=app_version, app_cflags=flags, arch=target))
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def cross_link_flags(arch: Arch) -> list[str]:
    """Returns the link flags of a program for ``arch`` built on another host: the cross
    toolchain's loader and library path (``/usr/<multiarch>/lib``), so that qemu-user runs
    it without ``-L`` (docs/aarch64.md, "What ran under qemu-user")."""
    lib = f"/usr/{arch.multiarch}/lib"
    loader = {"aarch64": "ld-linux-aarch64.so.1", "x86_64": "ld-linux-x86-64.so.2"}[arch.name]
    return [f"-Wl,--dynamic-linker={lib}/{loader}", f"-Wl,-rpath={lib}"]


def deep_dir(base: Path, length: int = 150) -> Path:
    """Returns a new directory under ``base`` whose path is at least ``length`` bytes
    (``sandbox-sock<pid>`` in it then cannot be bound by its path: sun_path is 108)."""
    d = base
    while len(os.fsencode(d)) < length:
        d = d / ("d" * 40)
    d.mkdir(parents=True)
    return d


BIN = Path(sys.executable).parent


def unique_build_id() -> str:
    """Returns a linker flag giving a build a random build-id: a test whose `apply --all`
    or `install --apply` selects processes by build-id must not reach processes of the same
    source that another test run on this machine started."""
    return f"-Wl,--build-id=0x{secrets.token_hex(20)}"


def run_tool(
    tool: str, *args: object, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of the installed console script ``tool`` (patchbox,
    extract-patch); asserts success unless ``check`` is false."""
    proc = subprocess.run(
        [str(BIN / tool), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"{tool} {args} failed: {proc.stderr}"
    return proc


def run_with_tools(
    *args: object, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of ``args`` (make, a built program, a console script)
    with this interpreter's console scripts first on PATH, as a user's shell with the
    package installed has them (make trees call `patchbox config`); asserts success
    unless ``check`` is false."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"{args} failed: {proc.stdout}{proc.stderr}"
    return proc


# `patchbox` run three ways (tests of cli/fast.py): the console script; the fast path
# alone (exit status FELL_BACK when it leaves the command line to click); click alone.
FELL_BACK = 99
CLI_WAYS = {
    "console": [str(BIN / "patchbox")],
    "fast": [
        sys.executable,
        "-c",
        "import sys; from patchbox.cli.fast import try_info; "
        f"status = try_info(sys.argv[1:]); sys.exit({FELL_BACK} if status is None else status)",
    ],
    "click": [sys.executable, "-c", "from patchbox.cli.main import main; main()"],
}
# Runs `patchbox ARGS` as the console script does and prints, as its last stdout line,
# the modules that this imported (those of the interpreter's own start-up left out).
IMPORTS_OF_MAIN = """
import sys
before = set(sys.modules)
sys.argv = ["patchbox", *sys.argv[1:]]
from patchbox.cli import main
try:
    main()
except SystemExit:
    pass
print("imported:", " ".join(sorted(set(sys.modules) - before)))
"""


def run_cli_way(
    way: str, *args: object, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of `patchbox ARGS` the way ``way`` of CLI_WAYS, with the
    environment plus ``env``."""
    return subprocess.run(
        [*CLI_WAYS[way], *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )


def modules_imported(*args: object, env: dict[str, str] | None = None) -> set[str]:
    """Returns the modules `patchbox ARGS` imports (IMPORTS_OF_MAIN)."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF_MAIN, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("imported: "), proc.stdout + proc.stderr
    return set(last.removeprefix("imported: ").split())


def info_json(pid: int) -> dict[str, Any]:
    """Returns `patchbox info -p PID --json` as a dict."""
    info: dict[str, Any] = json.loads(run_tool("patchbox", "info", "-p", pid, "--json").stdout)
    return info


def compile_with_small_sandbox(src: str, out: Path, sandbox: int, arch: str | None = None) -> Path:
    """Returns ``out``: ``src`` linked with an agent built with SANDBOX_ALLOC=``sandbox``
    (for the architecture called ``arch``, default this host's: `make ARCH=`)."""
    agent = out.parent.parent / f"agent-{sandbox}"
    cmd = ["make", "-s", "-C", str(ROOT / "agent"), f"OUT={agent}", f"SANDBOX_ALLOC={sandbox}"]
    subprocess.run([*cmd, *([f"ARCH={arch}"] if arch else [])], check=True, capture_output=True)
    return compile_c(src, out, agent=agent, arch=arch)


# -- acting as an unprivileged user (docs/security.md) ------------------------------------

NOBODY_UID = 65534
NOGROUP_GID = 65534
# util-linux: run a command as nobody:nogroup with no supplementary group.
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def as_nobody(*cmd: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Returns the finished run of ``cmd`` as nobody:nogroup (setpriv); asserts success
    unless ``check`` is false."""
    proc = subprocess.run(
        [*AS_NOBODY, *map(str, cmd)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"as nobody: {cmd}: {proc.stderr}"
    return proc


def nobody_python(code: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Returns the run of Python ``code`` (argv[1:] = ``args``) as nobody:nogroup."""
    return as_nobody(sys.executable, "-c", code, *args)


def nobody_dir(parent: Path, name: str, mode: int = 0o755) -> Path:
    """Returns ``parent/name``, a new directory nobody owns (``mode``), as its home or a
    daemon's own directory would be."""
    d = parent / name
    d.mkdir()
    os.chown(d, NOBODY_UID, NOGROUP_GID)
    d.chmod(mode)
    return d


# A small patch (make_patch) for tests of the CLI, the file format and signing.
BUILD_ID = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
# 6 NOPs of padding, the 2-NOP entry, mov eax, 42; ret; then an 8-byte import slot
TEXT = b"\x90" * 8 + b"\xb8\x2a\x00\x00\x00\xc3" + bytes(8)


def make_patch() -> Patch:
    """Returns a small valid patch (``answer-42``: one function, data, bss, three fix-ups)
    for tests that need any patch file."""
    return Patch(
        name="answer-42",
        build_id=BUILD_ID,
        text=TEXT,
        bss_size=16,
        data=b"\x01\x00\x00\x00",
        functions=[Function("compute", 0x1139, 6, 8, b"\x90" * 8)],
        fixups=[
            Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.EXE, 9, 0x4010 - 4),
            Fixup(FixupSection.TEXT, FixupType.ABS64, FixupBase.IMPORT, 14, 0, "puts"),
            Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.EXE, 10, 0x4020 - 4),
        ],
        meta={"tool": "test", "source:compute": "app.c"},
    )


def elf_symbol(path: Path, name: str) -> Symbol:
    """Returns the first ``.symtab`` symbol ``name`` of the ELF file ``path``, read with
    pyelftools (the tests' reference reader)."""
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection), f"{path} has no .symtab"
        found = symtab.get_symbol_by_name(name)
        assert found, f"{path} has no symbol {name!r}"
        return found[0]


def gnu_build_id(path: Path) -> str:
    """Returns the hex build-id of the ``.note.gnu.build-id`` section of the ELF file
    ``path``, read with pyelftools."""
    with open(path, "rb") as f:
        notes = ELFFile(f).get_section_by_name(".note.gnu.build-id")
        assert isinstance(notes, NoteSection), f"{path} has no .note.gnu.build-id"
        desc: str = next(notes.iter_notes())["n_desc"]
        return desc


def project_qemu() -> Path:
    """Returns the project's QEMU (scripts/qemu/build-qemu.sh: Debian's 7.2 with the
    patchbox under test linked in; built on first use, ~5 min, cached after)."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / "qemu" / "build-qemu.sh")],
        # The patchbox under test, not another one on PATH.
        env={**os.environ, "PATCHBOX": str(BIN / "patchbox")},
        capture_output=True,
        text=True,
        timeout=3600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exe = Path(proc.stdout.strip().splitlines()[-1])
    assert exe.is_file()
    return exe


# The aarch64 cross toolchain (Debian's gcc-aarch64-linux-gnu, binutils-aarch64-linux-gnu;
# scripts/bootstrap.sh installs them, so CI runs what needs them).
CROSS_CC = "aarch64-linux-gnu-gcc"
needs_cross_cc = pytest.mark.skipif(
    shutil.which(CROSS_CC) is None,
    reason=f"no {CROSS_CC}: install gcc-aarch64-linux-gnu (scripts/bootstrap.sh does)",
)


def cross_cc(*args: object, cwd: Path) -> None:
    """Runs the aarch64 cross compiler in ``cwd``; raises with its stderr on failure."""
    done = subprocess.run(
        [CROSS_CC, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
