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
from typing import IO

from .image import GuestImage
from .netns import GUEST_ADDR, HOST_ADDR, PEER_PORT, PREFIX, Namespace, Peer, remove_stale
from .qmp import QMP
from .serial import GuestLog, Record

__all__ = ["DEFAULT_DISKS", "Disk", "Guest", "GuestConfig", "GuestError", "kernel_command_line"]

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
        self.started = 0.0  # time.monotonic() at QEMU's start

    # -- start ---------------------------------------------------------------------------

    def disk_path(self, name: str) -> Path:
        return self.workdir / f"{name}.img"

    def kernel_command_line(self) -> str:
        return kernel_command_line(self.config)

    def qemu_command(self, tap_fd: int | None) -> list[str]:
        """Returns QEMU's argument vector (``tap_fd``: the tap, None without network)."""
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
            f"unix:{self.qmp_path},server=on,wait=off",
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
        tap_fd = None
        try:
            if c.net:
                remove_stale(NETNS_PREFIX)
                self.ns = Namespace(f"{NETNS_PREFIX}-{os.getpid()}-{next(_counter)}")
                self.peer = Peer(self.ns.udp_socket(HOST_ADDR, PEER_PORT))
                tap_fd = self.ns.open_tap()
            argv = self.qemu_command(tap_fd)
            (self.workdir / "qemu.argv").write_text("\n".join(argv) + "\n")
            with self.qemu_log.open("wb") as err:
                self.started = time.monotonic()
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,  # the serial's input: never written, never closed
                    stdout=subprocess.PIPE,
                    stderr=err,
                    pass_fds=() if tap_fd is None else (tap_fd,),
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **c.env},
                )
        except BaseException:
            self.close()
            raise
        finally:
            if tap_fd is not None:
                os.close(tap_fd)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_serial, args=(self.proc.stdout,), name="guest-serial", daemon=True
        )
        self._reader.start()
        return self

    def _read_serial(self, stream: IO[bytes]) -> None:
        with self.serial_path.open("wb") as out:
            for raw in stream:
                now = time.monotonic()
                out.write(raw)
                out.flush()
                text = raw.decode(errors="replace").rstrip("\r\n")
                with self._cond:
                    self.log.add(text, now)
                    self._cond.notify_all()
        with self._cond:
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
        if self.ns is not None:
            self.ns.delete()
            self.ns = None

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
