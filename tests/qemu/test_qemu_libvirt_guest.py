"""A libvirt-managed QEMU running a real guest, patched and unpatched from diffs while the
guest's checked I/O runs (tiers `qemu`, `libvirt`, `guest`; root; docs/qemu.md, "A real
guest under libvirt").

The domain (scripts/libvirtd/guest.py) is the test guest of scripts/guest: Debian's kernel
and busybox, a virtio-blk disk, an AHCI disk and virtio-net, under TCG on q35, started by
the private libvirtd as libvirt-qemu with libvirt's seccomp sandbox. The three data-path
patches of scripts/guest/datapath.py (virtio-blk completion, virtio-net receive and
transmit, AHCI completion), each built from a diff with `patchbox build --qemu`, are
applied to the domain by its name and removed again, CYCLES times. Each patched function
reports itself on QEMU's standard error, which libvirt keeps in the domain's log: the
counts there must grow while the patches are in and stand still once they are out. The
guest must see no checksum error, no lost or late datagram, QMP must say `running`
whenever asked (through libvirt), and the QEMU process must stay the same."""

from __future__ import annotations

import fcntl
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemuutil import run

from helpers import BIN, ROOT, project_qemu

sys.path.append(str(ROOT / "scripts"))

from guest.datapath import CHANGES, build, count_hits
from guest.harness import GuestConfig
from guest.image import ensure_image
from guest.serial import Record, analyze
from libvirtd import Libvirtd, libvirtd_missing
from libvirtd.guest import LibvirtGuest

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt, pytest.mark.guest]

VM = f"pbg-lv-{os.getpid()}"
CYCLES = 5
HOLD_S = 2.0  # guest seconds with the patches in, and again with them out
BASELINE_S = 10.0  # guest seconds before the first apply: the loop's own gaps
AGENT_OBJECTS = ("libsandbox.o", "sandbox-listen.o")


def emulator_copy(qemu_exe: Path, dest: Path) -> Path:
    """Returns a copy of the cached QEMU build in ``dest``, taken under the cache's lock
    while the agent objects it was linked with are this checkout's.

    The cache is one per machine: a run from a checkout whose agent differs (another
    branch's agent source) relinks the binary (build-qemu.sh removes it first), which
    would make libvirt's start fail or the patches' build-id differ from the running
    QEMU's. The copy is the same file the build made; patches are built against it with
    the cache's build directory."""
    cache = qemu_exe.parent.parent
    libs = run(BIN / "patchbox", "config", "--libs").stdout.split()
    mine = {Path(w).name: Path(w) for w in libs if Path(w).name in AGENT_OBJECTS}
    assert sorted(mine) == sorted(AGENT_OBJECTS), libs
    for _ in range(3):
        with (cache / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            linked = cache / "agent"
            if qemu_exe.is_file() and all(
                filecmp.cmp(path, linked / name, shallow=False) for name, path in mine.items()
            ):
                copy = dest / qemu_exe.name
                shutil.copy2(qemu_exe, copy)
                return copy
        # Another checkout's agent is linked in: relink with ours (outside the lock, which
        # the script takes itself).
        assert project_qemu() == qemu_exe
    pytest.fail("the cached QEMU kept being relinked with another agent")


@pytest.fixture()
def reachable_dir() -> Iterator[Path]:
    """Yields a root-owned 0755 directory under /tmp: libvirt-qemu opens the domain's
    files there (tmp_path's parents are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="pbx-lvg-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def patchbox_all(*args: object) -> list[tuple[int, str]]:
    """Returns (pid, result) of each process `patchbox ARGS --json` acted on."""
    rows = json.loads(run(BIN / "patchbox", *args, "--json").stdout)
    return [(int(r["pid"]), str(r["result"])) for r in rows]


def host_times(records: list[Record]) -> list[float]:
    times = [r.host_t for r in records if r.host_t is not None]
    assert len(times) == len(records)
    return times


def host_gaps(records: list[Record]) -> float:
    """Returns the longest host-clock time between consecutive ``records``."""
    times = host_times(records)
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def gap_over(records: list[Record], t0: float, t1: float) -> float:
    """Returns the longest host-clock time between consecutive ``records`` whose interval
    overlaps [t0, t1]: how long the guest's progress stood still around that window."""
    times = host_times(records)
    return max((b - a for a, b in zip(times, times[1:]) if b >= t0 and a <= t1), default=0.0)


def test_datapath_patches_cycled_under_a_libvirt_guests_checked_io(  # noqa: PLR0915 - one scenario, start to stop
    qemu_exe: Path,
    tmp_path: Path,
    reachable_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    why = libvirtd_missing()
    if why:
        pytest.skip(why)
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
        pytest.skip("the host forwards IPv4: a tap in its namespace would let the guest out")
    emulator = emulator_copy(qemu_exe, reachable_dir)
    src = qemu_exe.parent.parent / "src"
    t0 = time.monotonic()
    patches = {
        name: build(
            src,
            emulator,
            change,
            tmp_path / "patches",
            patchbox=str(BIN / "patchbox"),
            build_dir=qemu_exe.parent,
        )
        for name, change in CHANGES.items()
    }
    build_s = time.monotonic() - t0
    image = ensure_image()

    daemon = Libvirtd(tmp_path / "libvirt")
    daemon.workdir.mkdir()
    daemon.start()
    try:
        config = GuestConfig(qemu=str(emulator))
        with LibvirtGuest(daemon, VM, image, reachable_dir / "guest", config) as g:
            ready = g.wait_ready()
            assert ready.fields["disks"] == "vda,sda"
            pid = g.pid
            # libvirt's sandbox is on, and the agent (linked in, started before it) is
            # reached on its abstract address.
            assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"-sandbox" in cmdline
            sandbox = cmdline[cmdline.index(b"-sandbox") + 1].decode()
            assert f"listening on @patchbox/sandbox-sock{pid}" in daemon.qemu_log(VM)
            statuses = [g.qmp_status()]

            g.wait_progress(BASELINE_S)
            baseline = g.snapshot().progress()
            assert count_hits(daemon.qemu_log(VM)) == dict.fromkeys(CHANGES, 0)

            cycles: list[dict[str, object]] = []
            windows: list[tuple[str, float, float]] = []
            for _ in range(CYCLES):
                t_apply = time.monotonic()
                for pbx in patches.values():
                    assert patchbox_all("apply", "--all", "--vm", VM, pbx) == [(pid, "applied")]
                apply_s = time.monotonic() - t_apply
                windows.append(("apply", t_apply, t_apply + apply_s))
                statuses.append(g.qmp_status())
                applied = count_hits(daemon.qemu_log(VM))
                g.wait_progress(HOLD_S)
                statuses.append(g.qmp_status())
                held = count_hits(daemon.qemu_log(VM))
                assert all(held[n] > applied[n] for n in CHANGES), (applied, held)

                t_remove = time.monotonic()
                for name in reversed(patches):
                    rows = patchbox_all("remove", "--all", "--vm", VM, f"pbx-{name}")
                    assert [p for p, _ in rows] == [pid], rows
                remove_s = time.monotonic() - t_remove
                windows.append(("remove", t_remove, t_remove + remove_s))
                statuses.append(g.qmp_status())
                removed = count_hits(daemon.qemu_log(VM))
                g.wait_progress(HOLD_S)
                statuses.append(g.qmp_status())
                assert count_hits(daemon.qemu_log(VM)) == removed
                assert daemon.qemu_pid(VM) == pid and g.alive()
                cycles.append(
                    {
                        "apply_s": round(apply_s, 2),
                        "remove_s": round(remove_s, 2),
                        "hits": {n: held[n] - applied[n] for n in CHANGES},
                    }
                )
            during = g.snapshot().progress()[len(baseline) :]
            assert g.snapshot().errors() == []
            log = g.stop()
            assert g.peer is not None
            peer = g.peer.counts
            boot = g.boot_seconds
    finally:
        daemon.stop()

    s = analyze(log)
    progress = log.progress()
    around = {
        kind: max(gap_over(progress, t0, t1) for k, t0, t1 in windows if k == kind)
        for kind in ("apply", "remove")
    }
    measured = {
        "build_3_patches_s": round(build_s, 1),
        "boot_s": round(boot or 0, 2),
        "sandbox": sandbox,
        "cycles": CYCLES,
        "apply_3_s_max": max(float(str(c["apply_s"])) for c in cycles),
        "remove_3_s_max": max(float(str(c["remove_s"])) for c in cycles),
        "longest_progress_gap_host_s_baseline": round(host_gaps(baseline), 3),
        "longest_progress_gap_host_s_cycles": round(host_gaps(during), 3),
        "longest_progress_gap_host_s_around_apply": round(around["apply"], 3),
        "longest_progress_gap_host_s_around_remove": round(around["remove"], 3),
        "longest_op_gap_ms": s.longest_op_gap_ms,
        "loop_s": round(s.seconds, 1),
        "ops_per_s": round(s.ops_per_s, 1),
        "per_cycle": cycles,
    }
    for key, value in measured.items():
        record_property(key, value)
    print("measured:", json.dumps(measured))

    assert set(statuses) == {"running"}, statuses
    summary = log.summary()
    assert summary is not None and summary.fields["reason"] == "stop"
    assert [r.text for r in log.errors()] == []
    assert (s.errors, s.lost, s.late, s.missing_seqs) == (0, 0, 0, 0)
    iters, slots = int(summary.num("iters")), int(ready.num("slots"))
    for disk in ("vda", "sda"):
        assert summary.num(f"ok.{disk}") == 2 * iters - slots
    assert s.net_ok == iters - 1  # the last datagram was answered with STOP
    assert (peer.echoed, peer.dropped, peer.corrupted, peer.bad) == (iters - 1, 0, 0, 0)
