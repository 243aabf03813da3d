"""What the hold of a held entry jump costs (docs/reach.md, "What the hold sees"); prints
one table.

    .venv/bin/python -m benchmarks.bench_hold [--repeat N] [--agent-dir DIR]
        [--memcached MIB ...] [--threads N --arena MIB]

Each row is one program, attached (`patchbox attach`), a held patch applied and removed
``--repeat`` times while it runs: how long the client held the threads (the longest stop of
one thread, what `patchbox apply` prints), and, for an agent that reports it (INFO
hold_scan), what its memory check read and how long its scans took.

- memcached as Debian ships it (scripts/reach/memcached.sh builds the symbols), four worker
  threads, its cache filled with MIB MiB of 16 KiB values, four clients storing and reading
  meanwhile; the patch is the reach tier's `out_string` fix;
- a synthetic program of N threads blocked in read(), each having malloc'd MIB MiB in
  small blocks (one malloc arena per thread: heaps of at most 64 MiB, all read).

``--agent-dir`` attaches another build of libsandbox.so (e.g. one made from an older
commit) for comparison. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from patchbox.config import preload
from patchbox.errors import ProtocolError
from patchbox.format.layout import read_patch_file
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import discover
from patchbox.reach.attach import attach
from patchbox.reach.hold import apply_held

from .common import ROOT, print_table

BIN = Path(sys.executable).parent
STOCK = Path("/usr/bin/memcached")
PORT = 21988
SYNTH = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
__attribute__((noipa)) int answer(int x) { return x * 7 + 3; }
static int gate[2], ready[2];
static long mib;
static void *worker(void *arg) {
    char c = 0;
    (void)arg;
    for (long i = 0; i < mib * 256; i++)
        memset(malloc(4000), (int)i, 4000);
    (void)!write(ready[1], &c, 1);
    (void)!read(gate[0], &c, 1);
    return NULL;
}
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    char line[64], c;
    pthread_t t;
    mib = atol(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(gate) || pipe(ready))
        return 1;
    for (int i = 0; i < threads; i++)
        pthread_create(&t, NULL, worker, NULL);
    for (int i = 0; i < threads; i++)
        (void)!read(ready[0], &c, 1);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin))
        printf("%d\n", answer(atoi(line)));
    return 0;
}
"""
FIX = "__attribute__((noipa)) int answer(int x) { return x * 8 + 3; }\n"


def sh(*cmd: object, cwd: Path | None = None) -> str:
    return subprocess.run(
        [str(c) for c in cmd], check=True, capture_output=True, text=True, cwd=cwd
    ).stdout


def socket_of(pid: int) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [c for c in discover(pid, environ={}).candidates if c.source.startswith("/proc/")]
        if found:
            return found[0].path
        time.sleep(0.02)
    raise SystemExit(f"no agent socket for pid {pid}")


def measure(pid: int, pbx: Path, library: str, repeat: int) -> tuple[str, ...]:
    """Returns one row: the held time over ``repeat`` applies, what the agent scanned."""
    attach(pid, library)
    pf = read_patch_file(pbx)
    patch, body = pf.patch, pf.body
    held, scans, scanned, skipped = [], [], "-", "-"
    path = socket_of(pid)
    for _ in range(repeat):
        with Client(path) as client:
            info = client.info()
            _result, stats = apply_held(client, pid, patch, body, info)
            assert stats is not None
            held.append(stats.longest_ns)
            m = re.match(
                r"(\d+) mappings, (\d+) bytes in (\d+) us; (\d+) over",
                client.info().get("hold_scan", ""),
            )
            if m:
                scans.append(int(m[3]))
                scanned = f"{int(m[2]) / 2**20:.1f} MiB in {m[1]}"
                skipped = m[4]
            try:
                client.remove(patch.name)
            except ProtocolError:
                pass  # an agent from before REMOVE's state byte: removed all the same
        time.sleep(0.05)
    held.sort()
    return (
        f"{statistics.median(held) / 1e6:.2f}",
        f"{held[int(len(held) * 0.9) - 1] / 1e6:.2f}",
        f"{held[-1] / 1e6:.2f}",
        scanned,
        skipped,
        f"{statistics.median(scans) / 1e3:.2f}" if scans else "-",
    )


def make_variable(makefile: str, name: str) -> list[str]:
    """Returns the words of the variable ``name`` a generated Makefile sets."""
    m = re.search(rf"^{name} = (.*)$", makefile, re.M)
    assert m is not None, f"the Makefile sets no {name}"
    return shlex.split(m[1])


def memcached_patch(d: Path) -> Path:
    """Returns the reach tier's `out_string` patch of the stock memcached."""
    build = Path(sh(ROOT / "scripts" / "reach" / "memcached.sh").strip().splitlines()[-1])
    src = (build / "memcached.c").read_text()
    (d / "memcached.c").write_text(
        src.replace(
            "    len = strlen(str);\n    if ((len + 2) > WRITE_BUFFER_SIZE) {",
            '    if (strncmp(str, "VERSION ", 8) == 0)\n        str = "VERSION " VERSION " (p)";\n'
            "    len = strlen(str);\n    if ((len + 2) > WRITE_BUFFER_SIZE) {",
        )
    )
    mk = (build / "Makefile").read_text()
    cflags, cppflags = (make_variable(mk, name) for name in ("CFLAGS", "CPPFLAGS"))
    flags = sh(BIN / "patchbox", "config", "--cflags").split()
    sh("gcc", "-DHAVE_CONFIG_H", "-DNDEBUG", f"-I{build}", *cppflags,
       *[f for f in cflags if f != "-Werror"], *flags, "-c", "memcached.c", "-o", "fix.o",
       cwd=d)  # fmt: skip
    sh(BIN / "extract-patch", "-f", "out_string", "--symbols", build / "memcached",
       "--name", "hold", "-o", d / "mc.pbx", d / "fix.o", STOCK)  # fmt: skip
    return d / "mc.pbx"


def memcached_row(d: Path, pbx: Path, fill: int, library: str, repeat: int) -> tuple[str, ...]:
    proc = subprocess.Popen(
        [str(STOCK), "-u", "root", "-l", "127.0.0.1", "-p", str(PORT), "-U", "0", "-t", "4",
         "-m", str(fill + 64)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop = threading.Event()
    loads: list[threading.Thread] = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        value = b"x" * 16384
        with socket.create_connection(("127.0.0.1", PORT)) as s:
            for i in range(fill * 64):
                s.sendall(b"set fill%d 0 0 %d noreply\r\n%s\r\n" % (i, len(value), value))
            s.sendall(b"version\r\n")
            s.recv(100)

        def load(me: int) -> None:
            with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                f = s.makefile("rwb")
                n = 0
                while not stop.is_set():
                    n += 1
                    f.write(
                        b"set c%dk%d 0 0 2\r\nvv\r\nget c%dk%d\r\n" % (me, n % 100, me, n % 100)
                    )
                    f.flush()
                    for _ in range(4):
                        f.readline()

        loads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in loads:
            t.start()
        time.sleep(0.2)
        return (
            f"memcached -t 4, {fill} MiB cached, under load",
            *measure(proc.pid, pbx, library, repeat),
        )
    finally:
        stop.set()
        for t in loads:
            t.join()
        proc.kill()
        proc.wait()


def synth_row(d: Path, threads: int, arena: int, library: str, repeat: int) -> tuple[str, ...]:
    exe = d / "synth"
    if not exe.exists():
        (d / "synth.c").write_text(SYNTH)
        sh(
            "gcc",
            "-O0",
            "-fcf-protection=none",
            "-pthread",
            "-Wl,--build-id",
            d / "synth.c",
            "-o",
            exe,
        )
        (d / "sfix.c").write_text(FIX)
        flags = sh(BIN / "patchbox", "config", "--cflags").split()
        sh("gcc", "-O0", *flags, "-c", d / "sfix.c", "-o", d / "sfix.o")
        sh(
            BIN / "extract-patch",
            "-f",
            "answer",
            "--name",
            "hold",
            "-o",
            d / "s.pbx",
            d / "sfix.o",
            exe,
        )
    p = subprocess.Popen(
        [str(exe), str(threads), str(arena)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        name = f"{threads} threads blocked, {arena} MiB malloc'd each"
        return (name, *measure(p.pid, d / "s.pbx", library, repeat))
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--agent-dir", type=Path, help="a directory holding another libsandbox.so")
    ap.add_argument("--memcached", type=int, nargs="*", default=[0, 48, 400], metavar="MIB")
    ap.add_argument("--threads", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--arena", type=int, default=16, metavar="MIB")
    args = ap.parse_args()
    library = str(args.agent_dir / "libsandbox.so" if args.agent_dir else preload())
    rows: list[tuple[str, ...]] = []
    runs: list[Callable[[Path], tuple[str, ...]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.memcached and STOCK.exists():
            pbx = memcached_patch(d)
            runs += [
                functools.partial(
                    memcached_row, pbx=pbx, fill=f, library=library, repeat=args.repeat
                )
                for f in args.memcached
            ]
        runs += [
            functools.partial(
                synth_row, threads=n, arena=args.arena, library=library, repeat=args.repeat
            )
            for n in args.threads
        ]
        for run in runs:
            rows.append(run(d))
            print(rows[-1], file=sys.stderr)
    print(f"Held entry jump, applied and removed {args.repeat} times; agent {library}")
    print_table(
        ("program", "held ms median", "p90", "max", "memory check read", "over 64 MiB", "scans ms"),
        rows,
    )


if __name__ == "__main__":
    main()
