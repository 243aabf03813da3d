"""Live migration of the test guest on one host (``-m guest``): the operators' way to get a
VM off a QEMU, measured beside patchbox in benchmarks/bench_guest_pause.py. The guest
moves back and forth between QEMUs of the project's build (Debian's device set, the
agent linked in) while its checked I/O loop runs: nothing may be lost or damaged, the
loop must go on, and each pause is recorded."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from guest.harness import Guest, GuestConfig, Migration
from guest.image import GuestImage
from guest.netns import GUEST_ADDR, HOST_ADDR, TAP, Namespace, Peer, set_queue
from guest.serial import GuestLog, analyze, host_gaps, pause_around

pytestmark = pytest.mark.guest

MIGRATIONS = 6
GUEST_MAC = "52:54:00:4e:00:02"
TUNSETOFFLOAD = 0x400454D0  # <linux/if_tun.h>
TUN_F_CSUM, TUN_F_UFO = 0x01, 0x10


def udp_payloads(fd: int) -> list[bytes]:
    """Returns the UDP payloads of the IPv4 frames waiting in tap queue ``fd`` (read out),
    in their order; other frames (IPv6 neighbour discovery) are read and left out."""
    frames = udp_frames(fd)
    assert all(f[:6] == bytes.fromhex(GUEST_MAC.replace(":", "")) for f in frames)
    return [f[14 + 20 + 8 :] for f in frames]


def test_hand_over_moves_the_frames_waiting_for_the_old_queue_to_the_new_one() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and its tap)")
    ns = Namespace(f"pbgt-{os.getpid()}")
    fds: list[int] = []
    try:
        old = ns.open_tap()
        fds.append(old)
        new = ns.open_tap(attached=False)
        fds.append(new)
        # The guest's address resolved without a guest: datagrams go straight out.
        subprocess.run(
            ["ip", "-n", ns.name, "neigh", "replace", GUEST_ADDR, "lladdr", GUEST_MAC]
            + ["dev", TAP],
            check=True,
        )
        peer = Peer(ns.udp_socket(HOST_ADDR, 7778))
        try:
            for i in range(3):
                peer.sock.sendto(b"before %d" % i, (GUEST_ADDR, 9))
            assert ns.hand_over(old, new, peer) >= 3
            peer.sock.sendto(b"after", (GUEST_ADDR, 9))
            assert udp_payloads(old) == []
            assert udp_payloads(new) == [b"before 0", b"before 1", b"before 2", b"after"]
            # And back: the old queue is the reader again.
            set_queue(old, attached=True)
            set_queue(new, attached=False)
            peer.sock.sendto(b"back", (GUEST_ADDR, 9))
            assert udp_payloads(old) == [b"back"]
            assert udp_payloads(new) == []
        finally:
            peer.close()
    finally:
        for fd in fds:
            os.close(fd)
        ns.delete()


def test_echoes_stay_whole_while_a_starting_qemu_probes_the_taps_offloads() -> None:
    """A destination QEMU starting on the tap turns checksum offload on for a moment
    (net/tap.c, tap_probe_has_ufo): the kernel then sends UDP frames out of the tap with
    their checksum not filled in. The peer's echoes carry none (0), so stay valid."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and its tap)")
    ns = Namespace(f"pbgt-{os.getpid()}")
    fd = -1
    try:
        fd = ns.open_tap()
        subprocess.run(
            ["ip", "-n", ns.name, "neigh", "replace", GUEST_ADDR, "lladdr", GUEST_MAC]
            + ["dev", TAP],
            check=True,
        )
        plain = ns.udp_socket(HOST_ADDR, 7779)
        peer = Peer(ns.udp_socket(HOST_ADDR, 7778))
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_UFO)  # as QEMU's probe
            plain.sendto(b"x" * 64, (GUEST_ADDR, 9))
            peer.sock.sendto(b"x" * 64, (GUEST_ADDR, 9))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            plain_frame, peer_frame = udp_frames(fd)
        finally:
            peer.close()
            plain.close()
        assert not udp_checksum_valid(plain_frame)  # what the guest would drop
        assert peer_frame[14 + 20 + 6 : 14 + 20 + 8] == b"\0\0"  # no checksum: valid
    finally:
        if fd >= 0:
            os.close(fd)
        ns.delete()


def udp_frames(fd: int) -> list[bytes]:
    """Returns the IPv4 UDP frames waiting in tap queue ``fd`` (read out)."""
    os.set_blocking(fd, False)
    out: list[bytes] = []
    while True:
        try:
            frame = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if frame[12:14] == b"\x08\x00" and frame[14 + 9] == socket.IPPROTO_UDP:
            out.append(frame)


def udp_checksum_valid(frame: bytes) -> bool:
    """Returns whether the UDP checksum of an IPv4 frame (no IP options) is right."""
    ip, udp = frame[14:34], frame[34:]
    udp = udp[: int.from_bytes(udp[4:6], "big")]
    data = ip[12:20] + bytes([0, socket.IPPROTO_UDP]) + len(udp).to_bytes(2, "big") + udp
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_guest_migrated_back_and_forth_loses_nothing(
    guest_image: GuestImage,
    guest_qemu: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    with Guest(guest_image, tmp_path, GuestConfig(qemu=str(guest_qemu))) as g:
        g.wait_ready()
        g.wait_progress(2)
        pids = [g.proc.pid if g.proc else 0]
        iters = []
        for _ in range(MIGRATIONS):
            before = g.snapshot().progress()[-1]
            m = g.migrate_local()
            assert g.qmp.status() == "running"
            after = g.wait_progress(1.5)
            # The same guest, its loop going on where it was (not rebooted).
            assert after.num("t") > before.num("t") and after.num("iter") > before.num("iter")
            assert after.num("seq") > before.num("seq")
            pids.append(m.dest_pid)
            iters.append(int(after.num("iter")))
        assert g.peer is not None
        log = g.stop()
        peer = g.peer.counts
        migrations = g.migrations
        at_switchover, other_losses = g.switchover_losses(log)
    assert len(set(pids)) == MIGRATIONS + 1
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    s = analyze(log)
    # Nothing lost or damaged, but for what QEMU itself drops at a switchover: an echo
    # that reaches the tap while the source stops its vCPUs (Guest.switchover_losses),
    # at most one per migration. Seen about once in 50 migrations here.
    assert other_losses == []
    assert len(set(at_switchover.values())) == len(at_switchover)
    lost = len(at_switchover)
    assert [r.fields.get("kind") for r in log.errors()] == ["lost"] * lost
    assert (s.errors, s.lost, s.late, s.missing_seqs) == (lost, lost, 0, 0)
    summary = log.summary()
    assert summary is not None and summary.fields["reason"] == "stop"
    iters_done = int(summary.num("iters"))
    # every datagram echoed (the last one answered STOP), every echo arrived but those
    assert (peer.echoed, peer.dropped, peer.bad) == (iters_done - 1, 0, 0)
    assert s.net_ok == iters_done - 1 - lost
    prog = log.progress()
    assert [int(r.num("seq")) for r in prog] == list(range(1, len(prog) + 1))
    # No pause on the guest's own clock (it stops with its VM) but the wait for a lost
    # echo. An echo taken by the destination before it ran would show here: the guest
    # waits for it, running, until the switchover (0.45-0.96 s when the destination shared
    # the source's tap queue).
    assert max(guest_gaps_without_errors(log)) < 0.5

    pauses = [pause_around(log, m.began, m.ended) for m in migrations]
    measured = {
        "pause_host_ms": [round(1e3 * (p or 0)) for p in pauses],
        "downtime_ms": [m.downtime_ms for m in migrations],
        "stop_to_resume_ms": [round(1e3 * m.event_pause_s, 1) for m in migrations],
        "total_ms": [m.total_ms for m in migrations],
        "handover_after_stop_ms": [
            round(1e3 * ((m.handed_over or m.stopped) - m.stopped), 1) for m in migrations
        ],
        "frames_moved": [m.frames_moved for m in migrations],
        "lost_at_switchover": {seq: m.number for seq, m in at_switchover.items()},
        "longest_gap_without_migrating_ms": round(1e3 * baseline_gap(log, migrations)),
    }
    for key, value in measured.items():
        record_property(key, value)
    print("measured:", measured)
    for m, pause in zip(migrations, pauses):
        assert pause is not None
        # The loop's pause covers the VM's stop (QEMU's downtime, STOP to RESUME).
        assert pause >= m.event_pause_s * 0.9
        assert m.handed_over is not None and m.handed_over - m.stopped < m.event_pause_s


def guest_gaps_without_errors(log: GuestLog) -> list[float]:
    """Returns the guest-clock intervals between consecutive PROGRESS lines that have no
    ERROR line between them."""
    gaps, last, error = [], None, False
    for rec in log.records:
        if rec.kind == "ERROR":
            error = True
        elif rec.kind == "PROGRESS":
            if last is not None and not error:
                gaps.append(rec.num("t") - last)
            last, error = rec.num("t"), False
    return gaps


def baseline_gap(log: GuestLog, migrations: list[Migration]) -> float:
    """Returns the longest host-clock PROGRESS interval overlapping no migration."""
    free = [
        b - a
        for a, b in host_gaps(log)
        if not any(b >= m.began and a <= m.ended for m in migrations)
    ]
    return max(free, default=0.0)
