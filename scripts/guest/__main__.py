"""The test guest by hand (docs/qemu.md, "A real guest"); from the checkout's root:

    PYTHONPATH=scripts .venv/bin/python -m guest image            # make or find the image
    PYTHONPATH=scripts .venv/bin/python -m guest run --seconds 30  # boot, run, measure (root)
    PYTHONPATH=scripts .venv/bin/python -m guest analyze serial.log

``run`` keeps its work directory (disk images, serial.log, qemu.log, qemu.argv) and prints
the measurements as ``key=value`` lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from .harness import Guest, GuestConfig
from .image import ensure_image
from .serial import Stats, analyze, parse_lines


def _print_stats(stats: Stats) -> None:
    for f in dataclasses.fields(stats):
        print(f"{f.name}={getattr(stats, f.name)}")
    print(f"ops={stats.ops}")
    print(f"ops_per_s={stats.ops_per_s:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m guest", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("image", help="make (or find in the cache) the kernel and initramfs")
    run = sub.add_parser("run", help="boot the guest, run its loop, print measurements")
    run.add_argument("--seconds", type=float, default=30, help="the loop's time (guest clock)")
    run.add_argument("--qemu", default=GuestConfig().qemu, help="QEMU binary")
    run.add_argument("--machine", default="q35")
    run.add_argument("--workdir", help="default: a new directory under /tmp")
    an = sub.add_parser("analyze", help="measurements of a serial log file")
    an.add_argument("log", type=Path)
    a = ap.parse_args(argv)

    if a.command == "analyze":
        _print_stats(analyze(parse_lines(a.log.read_text(errors="replace").splitlines())))
        return 0
    image = ensure_image()
    if a.command == "image":
        print(f"kernel={image.kernel}")
        print(f"initrd={image.initrd}")
        print(f"release={image.kernel_release}")
        print(f"packages={' '.join(f'{p}={v}' for p, v in image.packages.items())}")
        print(f"modules={','.join(image.modules)}")
        return 0
    if os.geteuid() != 0:
        print("python -m guest run: needs root (a network namespace and its tap)", file=sys.stderr)
        return 2
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="pbx-guest-"))
    config = GuestConfig(qemu=a.qemu, machine=a.machine)
    with Guest(image, workdir, config) as g:
        g.wait_ready()
        print(f"workdir={workdir}")
        print(f"boot_seconds={g.boot_seconds:.2f}")
        t0 = time.monotonic()
        g.wait_progress(a.seconds)
        status = g.qmp.status()
        log = g.stop()
        print(f"host_seconds={time.monotonic() - t0:.1f}")
        print(f"qmp_status={status}")
        print(f"peer={g.peer.counts if g.peer else None}")
    stats = analyze(log)
    _print_stats(stats)
    for rec in log.errors():
        print(rec.text)
    return 0 if stats.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
