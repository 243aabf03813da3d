"""The host's side of the test guest: QEMU started with the image, two disks and a tap, the
peer answering the guest's datagrams, the serial console read line by line.

    with Guest(ensure_image(), workdir) as g:
        g.wait_ready()
        g.wait_progress(30)                 # 30 s of the guest's loop
        assert g.qmp.status() == "running"
        log = g.stop()                      # the guest prints SUMMARY and powers off
    print(analyze(log))

QEMU runs under TCG (``-accel tcg``) with a q35 machine: a virtio-blk disk (``vda``), a
disk on the machine's ATA controller (``sda``: AHCI on q35, PIIX IDE on ``pc``),
virtio-net on the tap of a namespace of its own (:mod:`.netns`), the serial console on
QEMU's standard output (``serial.log`` in the work directory, each line stamped with the
host's clock as it is read), QMP on ``qmp.sock``, QEMU's own messages in ``qemu.log``. The
binary is ``$PATCHBOX_GUEST_QEMU`` or ``GuestConfig.qemu`` (default: ``qemu-system-x86_64``
from ``PATH``, Debian's package). Needs root (the namespace and its tap).

:meth:`Guest.migrate_local` live-migrates the running guest to a second QEMU on this host,
as an operator moves a VM off a QEMU (docs/qemu.md, "Live migration on one host"); the
destination becomes the guest's QEMU.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .image import GuestImage
from .netns import GUEST_ADDR, HOST_ADDR, PEER_PORT, PREFIX, Namespace, Peer, remove_stale
from .qmp import QMP
from .serial import GuestLog, Record

__all__ = [
    "DEFAULT_DISKS",
    "Disk",
    "Guest",
    "GuestConfig",
    "GuestError",
    "Migration",
    "kernel_command_line",
]

_counter = itertools.count()
# Namespaces are named NETNS_PREFIX-PID-N: a run's own, and stale ones found by their PID.
NETNS_PREFIX = "pbg"


class GuestError(Exception):
    """The guest did not do what was waited for; the message ends with the tails of the
    serial console and of QEMU's messages."""


@dataclass(frozen=True)
class Disk:
    """A disk of the guest: its name there (``vda``, ``sda``) and its bus: ``virtio``
    (virtio-blk-pci) or ``ata`` (ide-hd on the machine's controller: AHCI on q35)."""

    name: str
    bus: str


DEFAULT_DISKS = (Disk("vda", "virtio"), Disk("sda", "ata"))


@dataclass(frozen=True)
class GuestConfig:
    """How the guest is started; the loop's settings go to pbguest (``pbg.*`` on the
    kernel command line)."""

    qemu: str = field(
        default_factory=lambda: os.environ.get("PATCHBOX_GUEST_QEMU", "qemu-system-x86_64")
    )
    machine: str = "q35"
    memory_mb: int = 256
    disks: tuple[Disk, ...] = DEFAULT_DISKS
    disk_mb: int = 16
    net: bool = True
    block: int = 16384  # bytes per write and read, a multiple of 4096
    slots: int = 64  # blocks per disk the loop cycles through
    seconds: float = 0  # the loop's own end (0: until stop())
    progress_ms: int = 100
    net_timeout_ms: int = 2000  # an echo later than this counts lost
    extra_args: tuple[str, ...] = ()  # more QEMU options
    env: dict[str, str] = field(default_factory=dict)  # more of QEMU's environment


def kernel_command_line(
    config: GuestConfig, host_addr: str = HOST_ADDR, guest_addr: str = GUEST_ADDR
) -> str:
    """Returns the guest's kernel command line for ``config``: the serial console, the
    loop's settings (``pbg.*``) and, with network, the guest's address and its peer's
    (``host_addr``, ``guest_addr``: the tap's /24, default the namespace's)."""
    c = config
    words = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        f"pbg.disks={','.join(d.name for d in c.disks)}",
        f"pbg.block={c.block}",
        f"pbg.slots={c.slots}",
        f"pbg.seconds={c.seconds:g}",
        f"pbg.progress-ms={c.progress_ms}",
        f"pbg.net-timeout-ms={c.net_timeout_ms}",
    ]
    if c.net:
        words += [f"pbg.ip={guest_addr}/{PREFIX}", f"pbg.peer={host_addr}:{PEER_PORT}"]
    return " ".join(words)


@dataclass(frozen=True)
class Migration:
    """One same-host live migration (:meth:`Guest.migrate_local`).

    Host times are ``time.monotonic()``: ``began`` the destination QEMU started,
    ``sent`` the ``migrate`` command sent, ``completed`` the source's MIGRATION event
    ``completed`` read, ``ended`` the source QEMU gone. ``stopped`` and ``resumed`` are
    the times QEMU stamped on the source's STOP and the destination's RESUME events (the
    VM stopped here, ran there). ``handed_over``: the tap's traffic moved to the
    destination's queue (None without network), ``frames_moved`` frames moved with it.
    What QEMU reported (``query-migrate`` on the source): ``downtime_ms`` (its own
    measure of the VM's stop), ``total_ms``, ``setup_ms``, ``ram_bytes`` transferred,
    ``dirty_sync_count`` (RAM passes)."""

    number: int
    source_pid: int
    dest_pid: int
    began: float
    sent: float
    stopped: float
    handed_over: float | None
    frames_moved: int
    completed: float
    resumed: float
    ended: float
    downtime_ms: float
    total_ms: float
    setup_ms: float
    ram_bytes: int
    dirty_sync_count: int

    @property
    def event_pause_s(self) -> float:
        """Returns the time from the source's STOP to the destination's RESUME."""
        return self.resumed - self.stopped


def event_time(event: dict[str, object]) -> float:
    """Returns the ``time.monotonic()`` of a QMP event's ``timestamp`` (QEMU stamps events
    with the wall clock)."""
    stamp = event["timestamp"]
    assert isinstance(stamp, dict)
    wall = float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    return wall - (time.time() - time.monotonic())


class _Held:
    """Serial lines of a destination QEMU read before the source's last ones: kept back
    (with the host's time they were read) until the source's reader is done, so the
    guest's log stays in the guest's order."""

    def __init__(self) -> None:
        self.lines: list[tuple[bytes, float]] = []
        self.released = False


@dataclass
class _Destination:
    """A migration's destination QEMU: started, listening on ``uri``."""

    proc: subprocess.Popen[bytes]
    qmp: QMP
    qmp_path: Path
    uri: str
    reader: threading.Thread
    held: _Held
    began: float

    def kill(self) -> None:
        self.qmp.close()
        self.proc.kill()
        self.proc.wait(30)


@dataclass(frozen=True)
class _Steps:
    """What a migration went through (see :class:`Migration`): the source's STOP event,
    the tap handed over, the MIGRATION ``completed`` event read, ``query-migrate``'s
    answer, the destination's RESUME event."""

    sent: float
    stop: dict[str, Any]
    handed_over: float | None
    frames_moved: int
    completed: float
    info: dict[str, Any]
    resume: dict[str, Any]


def _migration_over(event: dict[str, object]) -> bool:
    data = event.get("data")
    return (
        event["event"] == "MIGRATION"
        and isinstance(data, dict)
        and data.get("status") in ("completed", "failed", "cancelled")
    )


class Guest:
    """A running guest; a context manager that stops everything it started."""

    def __init__(self, image: GuestImage, workdir: Path, config: GuestConfig | None = None) -> None:
        self.image = image
        self.workdir = workdir
        self.config = config or GuestConfig()
        self.log = GuestLog()
        self.serial_path = workdir / "serial.log"
        self.qemu_log = workdir / "qemu.log"
        self.qmp_path = workdir / "qmp.sock"
        self.ns: Namespace | None = None
        self.peer: Peer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._serial_out: IO[bytes] | None = None
        self._partial = b""  # the start of a line whose end the next QEMU prints
        # The tap's two queues (network only): the one QEMU reads, and a detached one
        # kept for the destination of the next migration.
        self._tap: int | None = None
        self._spare_tap: int | None = None
        self.migrations: list[Migration] = []
        self.started = 0.0  # time.monotonic() at QEMU's start

    # -- start ---------------------------------------------------------------------------

    def disk_path(self, name: str) -> Path:
        return self.workdir / f"{name}.img"

    def kernel_command_line(self) -> str:
        return kernel_command_line(self.config)

    def qemu_command(self, tap_fd: int | None, qmp_path: Path | None = None) -> list[str]:
        """Returns QEMU's argument vector (``tap_fd``: the tap, None without network;
        ``qmp_path``: QMP's socket, default :attr:`qmp_path`)."""
        c = self.config
        argv = [
            c.qemu,
            "-accel",
            "tcg",
            "-machine",
            c.machine,
            "-m",
            str(c.memory_mb),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            self.kernel_command_line(),
            "-chardev",
            "stdio,id=ser0,signal=off",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{qmp_path or self.qmp_path},server=on,wait=off",
        ]
        ata = 0
        for i, d in enumerate(c.disks):
            argv += ["-drive", f"if=none,id=disk{i},file={self.disk_path(d.name)},format=raw"]
            if d.bus == "virtio":
                device = "virtio-blk-pci"
            elif d.bus == "ata":
                device = f"ide-hd,bus=ide.{ata}"
                ata += 1
            else:
                raise ValueError(f"disk {d.name}: bus {d.bus!r} is neither virtio nor ata")
            argv += ["-device", f"{device},drive=disk{i},serial=pbg-{d.name}"]
        if tap_fd is not None:
            # romfile=: no iPXE option ROM (the kernel is loaded directly; a QEMU built
            # without its firmware has none).
            argv += [
                "-netdev",
                f"tap,id=net0,fd={tap_fd}",
                "-device",
                "virtio-net-pci,netdev=net0,mac=52:54:00:4e:00:02,romfile=",
            ]
        return argv + list(c.extra_args)

    def start(self) -> Guest:
        """Starts the namespace, the peer and QEMU; returns self (the guest is booting)."""
        c = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in c.disks:
            with self.disk_path(d.name).open("wb") as f:
                f.truncate(c.disk_mb << 20)
        self.qemu_log.write_bytes(b"")  # every QEMU of the guest appends to it
        self._serial_out = self.serial_path.open("wb")
        try:
            if c.net:
                remove_stale(NETNS_PREFIX)
                self.ns = Namespace(f"{NETNS_PREFIX}-{os.getpid()}-{next(_counter)}")
                self.peer = Peer(self.ns.udp_socket(HOST_ADDR, PEER_PORT))
                self._tap = self.ns.open_tap()
                self._spare_tap = self.ns.open_tap(attached=False)
            argv = self.qemu_command(self._tap)
            (self.workdir / "qemu.argv").write_text("\n".join(argv) + "\n")
            self.started = time.monotonic()
            self.proc = self._spawn(argv, self._tap)
        except BaseException:
            self.close()
            raise
        self._reader = self._start_reader(self.proc, None)
        return self

    def _spawn(self, argv: list[str], tap_fd: int | None) -> subprocess.Popen[bytes]:
        with self.qemu_log.open("ab") as err:
            return subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,  # the serial's input: never written, never closed
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=() if tap_fd is None else (tap_fd,),
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.config.env},
            )

    def _start_reader(self, proc: subprocess.Popen[bytes], held: _Held | None) -> threading.Thread:
        assert proc.stdout is not None
        reader = threading.Thread(
            target=self._read_serial,
            args=(proc.stdout, held),
            name=f"guest-serial-{proc.pid}",
            daemon=True,
        )
        reader.start()
        return reader

    def _read_serial(self, stream: IO[bytes], held: _Held | None) -> None:
        for raw in stream:
            now = time.monotonic()
            with self._cond:
                if held is not None and not held.released:
                    held.lines.append((raw, now))
                    continue
                self._take(raw, now)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _take(self, raw: bytes, now: float) -> None:
        # With self._cond held. A line a QEMU's output ended in (a migration's source
        # stopped while the guest was writing it) is finished by the next QEMU's first.
        raw, self._partial = self._partial + raw, b""
        if not raw.endswith(b"\n"):
            self._partial = raw
            return
        self._write_line(raw, now)

    def _write_line(self, raw: bytes, now: float) -> None:
        if self._serial_out is not None:
            self._serial_out.write(raw)
            self._serial_out.flush()
        self.log.add(raw.decode(errors="replace").rstrip("\r\n"), now)

    def _release(self, held: _Held) -> None:
        with self._cond:
            for raw, now in held.lines:
                self._take(raw, now)
            held.lines.clear()
            held.released = True
            self._cond.notify_all()

    # -- watch -----------------------------------------------------------------------------

    @property
    def qmp(self) -> QMP:
        """Returns the QMP session (connected on first use)."""
        if self._qmp is None:
            self._qmp = QMP(self.qmp_path)
        return self._qmp

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _tail(self) -> str:
        serial = self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""
        qemu = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        return f"\n--- serial (tail) ---\n{serial[-3000:]}\n--- qemu ---\n{qemu[-2000:]}"

    def wait_for(self, what: str, done: Callable[[GuestLog], bool], timeout: float) -> None:
        """Waits until ``done(log)`` holds; GuestError after ``timeout`` s or when QEMU ends
        first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.log):
                left = deadline - time.monotonic()
                reader_done = self._reader is None or not self._reader.is_alive()
                if left <= 0 or (reader_done and not done(self.log)):
                    state = "QEMU ended" if not self.alive() else f"{timeout:g} s passed"
                    raise GuestError(f"waiting for {what}: {state}{self._tail()}")
                self._cond.wait(min(left, 1.0))

    def wait_ready(self, timeout: float = 300) -> Record:
        """Returns the READY line once the guest's loop has started."""
        self.wait_for("READY", lambda log: log.ready() is not None, timeout)
        ready = self.log.ready()
        assert ready is not None
        return ready

    @property
    def boot_seconds(self) -> float | None:
        """Returns the host's time from QEMU's start to the READY line (None before it)."""
        ready = self.log.ready()
        return None if ready is None or ready.host_t is None else ready.host_t - self.started

    def wait_progress(self, seconds: float, timeout: float | None = None) -> Record:
        """Returns the first PROGRESS line ``seconds`` of guest time after the last one
        read now (after READY if none yet)."""
        with self._cond:
            prog = self.log.progress()
            ready = self.log.ready()
            base = prog[-1].num("t") if prog else ready.num("t") if ready else 0.0
        target = base + seconds

        def reached(log: GuestLog) -> bool:
            p = log.progress()
            return bool(p) and p[-1].num("t") >= target

        self.wait_for(f"PROGRESS t>={target:.1f}", reached, timeout or seconds * 4 + 60)
        return self.log.progress()[-1]

    def snapshot(self) -> GuestLog:
        """Returns a copy of the log read so far."""
        with self._cond:
            return GuestLog(list(self.log.records), self.log.other_lines)

    # -- faults ----------------------------------------------------------------------------

    def corrupt_disk(self, name: str, slots: range) -> None:
        """Overwrites ``slots`` of disk ``name`` in its image file, behind the guest's back;
        the guest must report each one it reads before rewriting it."""
        block = self.config.block
        fd = os.open(self.disk_path(name), os.O_WRONLY)
        try:
            for slot in slots:
                os.pwrite(fd, os.urandom(block), slot * block)
        finally:
            os.close(fd)

    # -- migrate --------------------------------------------------------------------------

    def migrate_local(
        self, *, timeout: float = 300, parameters: dict[str, object] | None = None
    ) -> Migration:
        """Live-migrates the guest to a new QEMU on this host and makes that one the
        guest's QEMU (:attr:`proc`, :attr:`qmp`); returns what it measured.

        The destination is started with the same argument vector but for its QMP socket
        and its tap queue, plus ``-incoming defer``; its serial console is read into the
        same log. It listens on a unix socket (``migrate-incoming``), the source migrates
        to it (``migrate``, QEMU's default settings unless ``parameters`` are given to
        ``migrate-set-parameters``), and the source quits once the destination runs. The
        disks are the same image files (QEMU hands their locks over on completion). The
        network: the destination gets the tap's spare queue, detached until the source
        has stopped (QEMU's tap backend reads its tap even while its VM is not running
        and holds the frame until it runs: on a queue both QEMUs read, the destination
        takes one of the running guest's echoes as it starts, and the guest waits for it
        until the switchover); on the source's STOP the guest's traffic is moved to it
        (:meth:`Namespace.hand_over`).
        """
        if self.proc is None or not self.alive():
            raise GuestError("migrate_local: QEMU is not running")
        number = len(self.migrations) + 1
        dest = self._start_destination(number)
        source, source_reader = self.proc, self._reader
        try:
            steps = self._migrate_to(dest, timeout, parameters)
            try:
                self.qmp.execute("quit")
            except (EOFError, OSError):
                pass  # it may close the connection before its answer
            source.wait(60)
        except BaseException:
            dest.kill()
            raise
        if source_reader is not None:
            source_reader.join(30)
        self._release(dest.held)
        info = steps.info
        ram = info.get("ram", {})
        migration = Migration(
            number=number,
            source_pid=source.pid,
            dest_pid=dest.proc.pid,
            began=dest.began,
            sent=steps.sent,
            stopped=event_time(steps.stop),
            handed_over=steps.handed_over,
            frames_moved=steps.frames_moved,
            completed=steps.completed,
            resumed=event_time(steps.resume),
            ended=time.monotonic(),
            downtime_ms=float(info["downtime"]),
            total_ms=float(info["total-time"]),
            setup_ms=float(info.get("setup-time", 0)),
            ram_bytes=int(ram.get("transferred", 0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
        )
        # The destination is the guest's QEMU now.
        if source.stdin is not None:
            source.stdin.close()
        self.qmp.close()
        self.proc, self._qmp, self._reader = dest.proc, dest.qmp, dest.reader
        self.qmp_path = dest.qmp_path
        self._tap, self._spare_tap = self._spare_tap, self._tap
        self.migrations.append(migration)
        return migration

    def _start_destination(self, number: int) -> _Destination:
        """Returns the destination QEMU of migration ``number``, started and listening."""
        qmp_path = self.workdir / f"qmp-{number}.sock"
        uri = f"unix:{self.workdir / f'migrate-{number}.sock'}"
        argv = self.qemu_command(self._spare_tap, qmp_path) + ["-incoming", "defer"]
        (self.workdir / f"qemu-{number}.argv").write_text("\n".join(argv) + "\n")
        began = time.monotonic()
        proc = self._spawn(argv, self._spare_tap)
        held = _Held()
        reader = self._start_reader(proc, held)
        try:
            qmp = QMP(qmp_path, timeout=120)
            qmp.execute("migrate-incoming", uri=uri)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
        return _Destination(proc, qmp, qmp_path, uri, reader, held, began)

    def _migrate_to(
        self, dest: _Destination, timeout: float, parameters: dict[str, object] | None
    ) -> _Steps:
        """Returns what the migration to ``dest`` went through, once the destination
        runs; on failure the network is handed back to the source."""
        sqmp = self.qmp
        sqmp.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        if parameters:
            sqmp.execute("migrate-set-parameters", **parameters)
        first = len(sqmp.events)
        sent = time.monotonic()
        sqmp.execute("migrate", uri=dest.uri)
        found = sqmp.wait_event(
            lambda e: e["event"] == "STOP" or _migration_over(e), timeout, start=first
        )
        if found is None or found[0]["event"] != "STOP":
            raise GuestError(f"migration: {found or 'no STOP'}{self._tail()}")
        stop = found[0]
        handed_over, frames = None, 0
        tap, spare = self._tap, self._spare_tap
        if self.ns is not None and tap is not None and spare is not None:
            frames = self.ns.hand_over(tap, spare, self.peer)
            handed_over = time.monotonic()
        try:
            found = sqmp.wait_event(_migration_over, timeout, start=first)
            if found is None or found[0]["data"]["status"] != "completed":
                raise GuestError(f"migration: {found or 'not over'}{self._tail()}")
            info = self._migrate_result(sqmp)
            resume = dest.qmp.wait_event(lambda e: e["event"] == "RESUME", 120)
            if resume is None:
                raise GuestError(f"migration: the destination never ran{self._tail()}")
        except BaseException:
            if self.ns is not None and handed_over is not None:
                assert tap is not None and spare is not None
                self.ns.hand_over(spare, tap, self.peer)  # the source runs on, if it can
            raise
        return _Steps(sent, stop, handed_over, frames, found[1], info, resume[0])

    def switchover_losses(
        self, log: GuestLog, *, before: float = 0.05
    ) -> tuple[dict[int, Migration], list[int]]:
        """Returns the guest's lost datagrams (``ERROR net kind=lost``) in two groups: by
        sequence number with its migration, those the peer echoed while that migration's
        source was stopping its VM (within ``before`` s before the STOP event); and the
        others (never echoed, or echoed at any other time).

        QEMU drops a frame that reaches the tap in that window: while the source waits
        for its vCPUs to stop it lets its main loop run, whose tap backend reads the
        frame and, the VM being no longer "running", queues it; the queue is dropped
        when the stop completes (net/net.c, net_vm_change_state_handler), before the
        STOP event this harness reacts to. An operator's migration loses such a frame
        the same way."""
        echoes = self.peer.echo_times if self.peer is not None else {}
        explained: dict[int, Migration] = {}
        other = []
        for rec in log.errors():
            if rec.word != "net" or rec.fields.get("kind") != "lost":
                continue
            seq = int(rec.fields["seq"])
            sent = echoes.get(seq)
            # 1 ms after STOP: the two clocks' conversion (event_time) is not exact.
            found = [
                m
                for m in self.migrations
                if sent is not None and m.stopped - before <= sent <= m.stopped + 0.001
            ]
            if found:
                explained[seq] = found[0]
            else:
                other.append(seq)
        return explained, other

    @staticmethod
    def _migrate_result(qmp: QMP) -> dict[str, Any]:
        # QEMU announces "completed" before it computes the times (downtime, total-time
        # are 0 until then): asked again until they are there.
        info: dict[str, Any] = {}
        for _ in range(500):
            info = qmp.execute("query-migrate")
            if info.get("total-time"):
                return info
            time.sleep(0.01)
        raise GuestError(f"query-migrate never gave the migration's times: {info}")

    # -- stop ------------------------------------------------------------------------------

    def stop(self, timeout: float = 120) -> GuestLog:
        """Ends the loop (the peer answers STOP; without network, waits for ``seconds``),
        waits for SUMMARY and for QEMU to end (the guest powers off); returns the log."""
        if self.peer is not None:
            self.peer.request_stop()
        self.wait_for("SUMMARY", lambda log: log.summary() is not None, timeout)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"QEMU still running 60 s after SUMMARY{self._tail()}") from e
        if self._reader is not None:
            self._reader.join(10)
        with self._cond:
            if self._partial:  # the guest's last words, without an end of line
                self._write_line(self._partial, time.monotonic())
                self._partial = b""
        return self.snapshot()

    def close(self) -> None:
        """Ends QEMU, the peer and the namespace, whatever state they are in."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except OSError:
                pass
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self._reader is not None:
            self._reader.join(10)
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        for fd in (self._tap, self._spare_tap):
            if fd is not None:
                os.close(fd)
        self._tap = self._spare_tap = None
        if self.ns is not None:
            self.ns.delete()
            self.ns = None
        if self._serial_out is not None:
            with self._cond:
                self._serial_out.close()
                self._serial_out = None

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
