"""The guest's data path patched under its I/O (``-m guest``): the project's QEMU (Debian's
device set, the agent linked in) runs the test guest; the functions that complete its
virtio-blk and AHCI requests and carry its virtio-net datagrams are changed by diffs
(scripts/guest/datapath.py), built with ``patchbox build --qemu``, and applied and removed
again and again while the guest's checked loop runs. The patched code is seen from outside
(its report lines in QEMU's log grow while applied, stop once removed); the guest sees
nothing: no checksum error, no lost datagram, QMP ``running`` throughout."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guest.datapath import CHANGES, build, count_hits
from guest.harness import Guest, GuestConfig
from guest.image import GuestImage
from guest.serial import analyze
from helpers import BIN

pytestmark = pytest.mark.guest

CYCLES = 5
APPLIED_S = 2.0  # guest seconds of the loop with the patches in, per cycle
REMOVED_S = 1.0


def patchbox(*args: object) -> dict[str, object]:
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_data_path_patched_and_removed_under_guest_io(
    guest_image: GuestImage,
    guest_qemu: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    src = guest_qemu.parent.parent / "src"  # build-qemu.sh's cache: src/ beside build/
    patches = {
        name: build(src, guest_qemu, c, tmp_path / "patches", patchbox=str(BIN / "patchbox"))
        for name, c in CHANGES.items()
    }
    config = GuestConfig(qemu=str(guest_qemu))
    cycles = []
    with Guest(guest_image, tmp_path / "guest", config) as g:
        g.wait_ready()
        g.wait_progress(3)
        assert g.proc is not None
        pid = g.proc.pid
        statuses = [g.qmp.status()]
        assert count_hits(g.qemu_log.read_text()) == dict.fromkeys(CHANGES, 0)
        for _ in range(CYCLES):
            before = count_hits(g.qemu_log.read_text())
            t0 = time.monotonic()
            for pbx in patches.values():
                patchbox("apply", "-p", pid, pbx)
            applied_at = time.monotonic()
            g.wait_progress(APPLIED_S)
            statuses.append(g.qmp.status())
            for pbx in reversed(patches.values()):
                patchbox("remove", "-p", pid, pbx.stem)
            removed_at = time.monotonic()
            time.sleep(0.2)  # a call under way at the remove may still print its line
            removed = count_hits(g.qemu_log.read_text())
            g.wait_progress(REMOVED_S)
            statuses.append(g.qmp.status())
            after = count_hits(g.qemu_log.read_text())
            cycles.append((before, removed, after, applied_at - t0, time.monotonic() - removed_at))
            assert int(str(patchbox("info", "-p", pid)["patches"])) == 0
        log = g.stop()
        assert g.peer is not None
        peer = g.peer.counts
    s = analyze(log)
    gaps = {
        "longest_progress_gap_host_s": round(s.longest_gap_host_s or 0, 3),
        "longest_progress_gap_guest_s": round(s.longest_gap_s, 3),
        "longest_op_gap_ms": s.longest_op_gap_ms,
        "loop_s": round(s.seconds, 1),
    }
    for key, value in gaps.items():
        record_property(key, value)
    print("measured:", gaps, "hits per cycle:", [c[1] for c in cycles])

    # The patched code ran while applied, in every cycle, on every path; and not after.
    for before, removed, after, _, _ in cycles:
        for name in CHANGES:
            assert removed[name] > before[name], (name, before, removed)
        assert after == removed, "a removed patch's code still ran"
    # The guest saw nothing.
    assert statuses == ["running"] * len(statuses)
    assert [r.text for r in log.errors()] == []
    assert (s.errors, s.lost, s.late, s.missing_seqs) == (0, 0, 0, 0)
    assert (peer.dropped, peer.corrupted, peer.bad) == (0, 0, 0)
    summary = log.summary()
    assert summary is not None and summary.fields["reason"] == "stop"
