"""A real guest (``-m guest``): Debian's kernel and busybox booted under TCG by Debian's
QEMU, its checked I/O loop on a virtio-blk disk, an AHCI disk and virtio-net, watched from
the host. The first test runs the loop clean; the second breaks disk data, datagrams and
echoes behind the guest's back and checks that each fault is reported, so the first one's
zero counts mean something."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guest.harness import Guest
from guest.image import GuestImage
from guest.serial import analyze

pytestmark = pytest.mark.guest

RUN_SECONDS = 40
# What pbguest calls a block that is not what it wrote there (kind= of an ERROR blk line).
DAMAGE = {"garbage", "header", "misplaced", "stale", "crc", "data"}


def test_guest_io_loop_runs_clean(
    guest_image: GuestImage, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    with Guest(guest_image, tmp_path) as g:
        ready = g.wait_ready()
        assert ready.fields["disks"] == "vda,sda"
        boot = g.boot_seconds
        assert boot is not None
        statuses = []
        t0 = time.monotonic()
        for _ in range(RUN_SECONDS // 5):
            g.wait_progress(5)
            statuses.append(g.qmp.status())
        host_seconds = time.monotonic() - t0
        log = g.stop()
        assert g.peer is not None
        peer = g.peer.counts
    s = analyze(log)
    measured = {
        "boot_s": round(boot, 2),
        "guest_uptime_at_ready_s": ready.num("t"),
        "loop_s": round(s.seconds, 1),
        "host_s": round(host_seconds, 1),
        "iterations_per_s": round(s.iterations / s.seconds, 1),
        "ops_per_s": round(s.ops_per_s, 1),
        "longest_progress_gap_guest_s": round(s.longest_gap_s, 3),
        "longest_progress_gap_host_s": round(s.longest_gap_host_s or 0, 3),
        "longest_op_gap_ms": s.longest_op_gap_ms,
    }
    for key, value in measured.items():
        record_property(key, value)
    print("measured:", measured)

    assert statuses == ["running"] * len(statuses)
    summary = log.summary()
    assert summary is not None and summary.fields["reason"] == "stop"
    assert [r.text for r in log.errors()] == []
    assert (s.errors, s.lost, s.late) == (0, 0, 0)
    assert s.missing_seqs == 0
    assert s.seconds >= RUN_SECONDS - 1
    assert s.progress_lines >= s.seconds * 5  # one every 100 ms asked; under half is a stall
    # Both disks and the network did their share of the work, every iteration.
    summary = log.summary()
    assert summary is not None
    iters, slots = int(summary.num("iters")), int(ready.num("slots"))
    for disk in ("vda", "sda"):
        # a read-back per iteration and an aged read from the second lap on
        assert summary.num(f"ok.{disk}") == 2 * iters - slots
    assert s.net_ok == iters - 1  # the last datagram was answered with STOP
    assert (peer.echoed, peer.dropped, peer.corrupted, peer.bad) == (iters - 1, 0, 0, 0)
    # Progress is monotonic on both clocks.
    prog = log.progress()
    assert [int(r.num("seq")) for r in prog] == list(range(1, len(prog) + 1))
    assert all(a.num("iter") <= b.num("iter") for a, b in zip(prog, prog[1:]))


def test_guest_reports_every_fault_put_behind_its_back(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    vda_slots, sda_slots = range(64), range(10, 20)
    with Guest(guest_image, tmp_path) as g:
        g.wait_ready()
        g.wait_progress(3)
        assert g.peer is not None
        before = g.snapshot()
        assert before.errors() == []
        g.corrupt_disk("vda", vda_slots)
        g.corrupt_disk("sda", sda_slots)
        g.peer.corrupt_next(3)
        g.wait_for(
            "the corrupt echoes",
            lambda log: sum(r.fields.get("kind") == "corrupt" for r in log.errors()) >= 3,
            60,
        )
        g.peer.drop_next(2)
        # Two laps over every slot: each corrupted block is read before it is rewritten.
        g.wait_progress(3)
        g.wait_progress(3)
        settled = len(g.snapshot().errors())
        g.wait_progress(3)
        assert len(g.snapshot().errors()) == settled, "errors went on after the faults were gone"
        assert g.qmp.status() == "running"
        log = g.stop()
        peer = g.peer.counts
    s = analyze(log)
    errors = log.errors()
    blk = [r for r in errors if r.word == "blk"]
    net = [r for r in errors if r.word == "net"]
    assert len(blk) + len(net) == len(errors) == s.errors == s.error_lines
    # Every disk error names a corrupted slot of its disk and a kind of damage, and every
    # corrupted slot was found but for at most one (rewritten between corruption and read).
    for disk, slots in (("vda", vda_slots), ("sda", sda_slots)):
        found = [r for r in blk if r.fields["disk"] == disk]
        assert all(int(r.fields["slot"]) in slots for r in found), [r.text for r in found]
        assert {r.fields["kind"] for r in found} <= DAMAGE
        seen = {int(r.fields["slot"]) for r in found}
        assert len(seen) >= len(slots) - 1, [r.text for r in found]
    # Three corrupted echoes and two dropped datagrams, each reported once, nothing else.
    assert sorted(r.fields["kind"] for r in net) == ["corrupt"] * 3 + ["lost"] * 2
    assert (peer.corrupted, peer.dropped) == (3, 2)
    assert (s.lost, s.late) == (2, 0)
    # The loop went on: verified reads and echoes after the last error.
    last_error = max(i for i, r in enumerate(log.records) if r.kind == "ERROR")
    after = [r for r in log.records[last_error:] if r.kind == "PROGRESS"]
    assert after and after[-1].num("blk_ok") > after[0].num("blk_ok")
    assert after[-1].num("net_ok") > after[0].num("net_ok")
