"""The Debian tier (``-m reach``): a stock daemon from Debian's packages, patched live.

memcached as Debian ships it (/usr/bin/memcached: stripped, no patchbox flag, no agent)
is started normally and kept busy by a client storing and reading keys. ``patchbox
attach`` loads the agent into it; a patch of ``out_string`` (the reply of every text
command; it starts with a 1-byte ``push %rbp``, so its entry jump is held) is built
against the stripped binary with symbols from a rebuild of Debian's source package (its
build-id may differ, its loaded bytes may not: docs/reach.md) and applied under that load: ``version``
answers differently, every reply of the load stays right, then it is removed.
scripts/reach/memcached.sh installs memcached and rebuilds it once (cached).
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, run_tool
from patchbox.elf.buildid import read_build_id
from patchbox.format.layout import load_patch
from patchbox.wire import ApplyFlag

pytestmark = [pytest.mark.reach, pytest.mark.timeout(1200)]
STOCK = Path("/usr/bin/memcached")
PORT = 21987


@pytest.fixture(scope="module")
def build_dir() -> Path:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "reach" / "memcached.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"memcached and its source package are not available: {proc.stderr[-400:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def ask(line: str) -> str:
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        s.sendall(line.encode() + b"\r\n")
        return s.recv(4096).decode()


@pytest.fixture()
def daemon() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [str(STOCK), "-u", "root", "-l", "127.0.0.1", "-p", str(PORT), "-U", "0", "-t", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            ask("version")
            break
        except OSError:
            assert time.monotonic() < deadline, "memcached did not start"
            time.sleep(0.05)
    yield proc
    alive = proc.poll() is None
    proc.kill()
    _out, err = proc.communicate()
    assert alive, f"memcached died: {err.decode()[-2000:]}"


def make_variable(makefile: str, name: str) -> list[str]:
    """Returns the words of the variable ``name`` a generated Makefile sets."""
    m = re.search(rf"^{name} = (.*)$", makefile, re.M)
    assert m is not None, f"the Makefile sets no {name}"
    return shlex.split(m[1])


def load(me: int, stop: threading.Event, errors: list[str], counts: list[int]) -> None:
    """Stores and reads its own keys over one connection until ``stop``; wrong replies go
    to errors."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        f = s.makefile("rwb")
        n = 0
        while not stop.is_set():
            n += 1
            value = f"v{n}".encode()
            f.write(b"set c%dk%d 0 0 %d\r\n%s\r\n" % (me, n % 100, len(value), value))
            f.write(b"get c%dk%d\r\n" % (me, n % 100))
            f.flush()
            stored = f.readline()
            got = [f.readline() for _ in range(3)]
            if stored != b"STORED\r\n" or got[1] != value + b"\r\n" or got[2] != b"END\r\n":
                errors.append(f"{stored!r} {got!r}")
                return
        counts.append(n)


def test_stock_memcached_attached_and_patched_under_load(
    build_dir: Path, daemon: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    original = ask("version")
    assert re.fullmatch(r"VERSION \d+\.\d+\.\d+\r\n", original), original
    out = run_tool("patchbox", "attach", "-p", daemon.pid).stdout
    assert re.search(r"stopped \d+\.\d+ ms", out), out

    # The fix: memcached.c of the source package with one changed line, compiled with the
    # package's own flags (from its configured tree) plus patchbox's.
    src = (build_dir / "memcached.c").read_text()
    fixed = src.replace(
        "    len = strlen(str);\n    if ((len + 2) > WRITE_BUFFER_SIZE) {",
        '    if (strncmp(str, "VERSION ", 8) == 0)\n        str = "VERSION " VERSION " (live-patched)";\n'
        "    len = strlen(str);\n    if ((len + 2) > WRITE_BUFFER_SIZE) {",
    )
    assert fixed != src
    (tmp_path / "memcached.c").write_text(fixed)
    flags = run_tool("patchbox", "config", "--cflags").stdout.split()
    mk = (build_dir / "Makefile").read_text()
    cflags, cppflags = (make_variable(mk, name) for name in ("CFLAGS", "CPPFLAGS"))
    obj = tmp_path / "memcached.o"
    subprocess.run(
        [
            "gcc",
            "-DHAVE_CONFIG_H",
            "-DNDEBUG",
            f"-I{build_dir}",
            *cppflags,
            *[f for f in cflags if f != "-Werror"],
            *flags,
            "-c",
            "memcached.c",
            "-o",
            str(obj),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    pbx = tmp_path / "version.pbx"
    run_tool(
        "extract-patch",
        "--function",
        "out_string",
        "--symbols",
        build_dir / "memcached",
        "--name",
        "version",
        "-o",
        pbx,
        obj,
        STOCK,
    )
    patch = load_patch(pbx)
    assert patch.flags & ApplyFlag.HOLD
    assert patch.build_id == read_build_id(STOCK)  # the running binary's, not the rebuild's
    assert patch.meta["symbols_match"] in ("build-id", "loaded-bytes"), patch.meta

    stop, errors, counts = threading.Event(), list[str](), list[int]()
    clients = [threading.Thread(target=load, args=(i, stop, errors, counts)) for i in range(4)]
    for c in clients:
        c.start()
    try:
        time.sleep(0.3)
        out = run_tool("patchbox", "apply", "-p", daemon.pid, pbx).stdout
        assert re.search(r"held \d+ thread\(s\) for at most \d+\.\d+ ms", out), out
        assert ask("version") == original.replace("\r\n", " (live-patched)\r\n")
        time.sleep(0.3)
        run_tool("patchbox", "remove", "-p", daemon.pid, "version")
        assert ask("version") == original
        time.sleep(0.3)
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert not errors, errors
    assert len(counts) == 4 and min(counts) > 100, counts
