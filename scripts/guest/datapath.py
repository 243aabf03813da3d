"""Patches of the guest's data path in QEMU 7.2, made from diffs as an operator makes them.

Each change adds one line at the top of the functions that complete or carry the guest's
I/O: it reports the call on QEMU's standard error (``error_report``: QEMU's own log, the
harness's ``qemu.log``, libvirt's ``/var/log/libvirt/qemu/NAME.log``) with a tag of its
own, so the patched code is seen running from outside, by counting lines, and seen gone
once the patch is removed. The rest of each function is the original: the guest's checked
I/O must go on as before.

    diffs = make_diffs(src)                         # {name: unified diff}
    pbx = build(src, exe, "blk", diffs["blk"], out) # patchbox build --qemu

The diffs are generated from the tree's own text (an anchor line per function), so they
apply to the source that built the binary whatever its line numbers.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHANGES", "Change", "build", "count_hits", "make_diff", "make_diffs"]

TAG = "pbx-datapath"


@dataclass(frozen=True)
class Change:
    """One patch: ``functions`` of ``source``, each opened by the line ``anchor[fn]``
    (the line after which the report goes: the function's first declaration)."""

    name: str
    source: str
    anchors: dict[str, str]
    what: str

    @property
    def functions(self) -> list[str]:
        return list(self.anchors)

    @property
    def tag(self) -> str:
        return f"{TAG} {self.name}"


CHANGES = {
    c.name: c
    for c in (
        Change(
            "blk",
            "hw/block/virtio-blk.c",
            {"virtio_blk_req_complete": "    VirtIODevice *vdev = VIRTIO_DEVICE(s);"},
            "virtio-blk request completion (every read and write of vda)",
        ),
        Change(
            "net",
            "hw/net/virtio-net.c",
            {
                "virtio_net_receive_rcu": "    ssize_t err;",
                "virtio_net_flush_tx": (
                    "    int queue_index = vq2q(virtio_get_queue_index(q->tx_vq));"
                ),
            },
            "virtio-net receive and transmit (every datagram and its echo)",
        ),
        Change(
            "ata",
            "hw/ide/ahci.c",
            {
                "ncq_cb": "    IDEState *ide_state = &ncq_tfs->drive->port.ifs[0];",
                "ahci_cmd_done": "    IDEState *ide_state = &ad->port.ifs[0];",
            },
            "AHCI command completion, queued (NCQ) and not (every read and write of sda)",
        ),
    )
}


def _patched_lines(change: Change, lines: list[str]) -> list[str]:
    out = list(lines)
    for fn, anchor in change.anchors.items():
        # The function's definition (its name at the start of a line after its type),
        # then the anchor: the first line equal to it after that.
        head = re.compile(rf"^\w[\w\s*]*\b{re.escape(fn)}\(")
        start = next((i for i, s in enumerate(out) if head.match(s) and not s.endswith(";\n")), -1)
        if start < 0:
            raise ValueError(f"{change.source}: no definition of {fn}")
        at = next((i for i in range(start, len(out)) if out[i].rstrip("\n") == anchor), -1)
        if at < 0 or at - start > 40:  # within the function's declarations
            raise ValueError(f"{change.source}: {fn} has no line {anchor!r}")
        out.insert(at + 1, f'    error_report("{change.tag} %s", __func__);\n')
    return out


def make_diff(src: Path, change: Change) -> str:
    """Returns the unified diff (``a/``, ``b/`` prefixes) of ``change`` on tree ``src``."""
    lines = (src / change.source).read_text().splitlines(keepends=True)
    new = _patched_lines(change, lines)
    return "".join(
        difflib.unified_diff(lines, new, f"a/{change.source}", f"b/{change.source}", n=3)
    )


def make_diffs(src: Path) -> dict[str, str]:
    """Returns every change's diff on tree ``src``, by name."""
    return {name: make_diff(src, c) for name, c in CHANGES.items()}


def build(
    src: Path,
    exe: Path,
    change: Change,
    out_dir: Path,
    *,
    patchbox: str = "patchbox",
    build_dir: Path | None = None,
) -> Path:
    """Builds ``change`` with ``patchbox build --qemu`` against ``exe`` (built from ``src``
    in its meson build directory, or in ``build_dir`` when ``exe`` is a copy kept
    elsewhere); returns the patch ``out_dir/pbx-NAME.pbx``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    diff = out_dir / f"pbx-{change.name}.diff"
    diff.write_text(make_diff(src, change))
    pbx = out_dir / f"pbx-{change.name}.pbx"
    proc = subprocess.run(
        [patchbox, "build", "--qemu", "--source", str(src), "--diff", str(diff)]
        + ["--binary", str(exe), "--name", f"pbx-{change.name}", "-o", str(pbx), "--explain"]
        + (["--build-dir", str(build_dir)] if build_dir is not None else []),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    (out_dir / f"pbx-{change.name}.explain").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"patchbox build of {change.name} failed:\n{proc.stderr[-3000:]}")
    return pbx


def count_hits(log_text: str) -> dict[str, int]:
    """Returns the number of report lines per change name in QEMU's standard error."""
    counts = dict.fromkeys(CHANGES, 0)
    for m in re.finditer(rf"{TAG} (\w+) ", log_text):
        if m.group(1) in counts:
            counts[m.group(1)] += 1
    return counts
