"""The test guest (scripts/guest, docs/qemu.md "A real guest") as a domain of the private
libvirtd: the same kernel, initramfs, disks, loop and peer as the harness's, but QEMU is
started by libvirt, as libvirt-qemu, from a domain's XML.

    with LibvirtGuest(daemon, "pbg-lv", ensure_image(), workdir, GuestConfig(qemu=EXE)) as g:
        g.wait_ready()
        g.wait_progress(30)
        assert g.qmp_status() == "running"   # through libvirt's monitor
        log = g.stop()                       # the guest prints SUMMARY and powers off

What differs from the harness, and why:

- *Boot*: ``<os>`` with ``<kernel>``, ``<initrd>`` and ``<cmdline>``; the files are copied
  into the work directory first, because libvirt's DAC driver hands every file of the
  domain to libvirt-qemu while it runs (``chown``) and back to root afterwards, and the
  image cache is shared.
- *Disks*: raw files in the work directory, ``vda`` on virtio-blk, ``sda`` on the q35's
  AHCI controller (``bus='sata'``; ``ide`` on ``pc``), serials ``pbg-vda``/``pbg-sda``.
  The work directory must be reachable by libvirt-qemu (``0755`` up to ``/``).
- *Network*: libvirt cannot be handed an open tap descriptor, and opens a tap by name in
  its own network namespace, which is the host's (the agent's abstract address is there
  too). So the tap is made in the host's namespace (:class:`HostTap`, ``pbl<PID>x<N>``),
  the domain names it with ``<interface type='ethernet'><target dev=TAP managed='no'/>``,
  and the peer binds to the tap's address. Each tap gets a /24 of its own,
  ``10.78.X.0/24`` with X from 100 on, the first no address of the host uses (chosen
  under a lock file, so concurrent runs differ); the harness's namespaces use
  ``10.78.0.0/24`` apart from the host's routes. The host does not forward (checked),
  so the guest reaches the host's tap address and nothing beyond it.
- *Serial console*: ``<serial type='unix'><source mode='bind'/>``: libvirt makes the
  listening socket and passes it to QEMU; the domain is started paused, the socket
  connected, then resumed, so no line is lost; each line is stamped with the host's clock
  as it is read, as the harness does (``serial.log`` too).
- *QMP*: libvirt's own monitor, through ``virsh qemu-monitor-command``.
- *QEMU's messages*: libvirt's log of the domain (``Libvirtd.qemu_log_path``).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from guest.harness import Disk, Guest, GuestConfig, GuestError, kernel_command_line
from guest.image import GuestImage
from guest.netns import PEER_PORT, PREFIX, Peer
from guest.serial import GuestLog

from . import Libvirtd, LibvirtError, _start_time

__all__ = ["HostTap", "LibvirtGuest", "guest_domain_xml"]

MAC = "52:54:00:4e:00:02"  # the harness's
# Taps are named TAP_PREFIX<PID>x<N>: a run's own, and stale ones found by their PID.
TAP_PREFIX = "pbl"
SUBNETS = range(100, 255)  # X of 10.78.X.0/24
NET_LOCK = Path("/run/patchbox-guest-net.lock")
_counter = itertools.count()


def _ip(*args: str) -> str:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def _net_lock() -> Iterator[None]:
    with NET_LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class HostTap:
    """A tap device of the host's network namespace, ``host_addr``/24 on it, not open by
    anyone until libvirt opens it by name for QEMU."""

    name: str
    subnet: int

    @property
    def host_addr(self) -> str:
        return f"10.78.{self.subnet}.1"

    @property
    def guest_addr(self) -> str:
        return f"10.78.{self.subnet}.2"

    @classmethod
    def create(cls) -> HostTap:
        """Returns a new tap, up, with the first free /24 of :data:`SUBNETS`."""
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
            # The guest would reach whatever the host routes to.
            raise OSError("the host forwards IPv4 (net.ipv4.ip_forward=1): no tap for a guest")
        name = f"{TAP_PREFIX}{os.getpid()}x{next(_counter)}"
        with _net_lock():
            remove_stale_taps()
            used = {int(m) for m in re.findall(r"\b10\.78\.(\d+)\.", _ip("-4", "addr", "show"))}
            used |= {int(m) for m in re.findall(r"\b10\.78\.(\d+)\.", _ip("-4", "route", "show"))}
            free = [x for x in SUBNETS if x not in used]
            if not free:
                raise OSError(f"no free 10.78.X.0/24 for a tap (used: {sorted(used)})")
            tap = cls(name, free[0])
            _ip("tuntap", "add", "dev", name, "mode", "tap")
            try:
                # No IPv6 on it: no router solicitations or MLD reports into the guest.
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
                _ip("addr", "add", f"{tap.host_addr}/{PREFIX}", "dev", name)
                _ip("link", "set", name, "up")
            except BaseException:
                tap.delete()
                raise
        return tap

    def udp_socket(self, port: int = PEER_PORT) -> socket.socket:
        """Returns a UDP socket bound to the tap's address and ``port``."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((self.host_addr, port))
        except BaseException:
            s.close()
            raise
        return s

    def delete(self) -> None:
        subprocess.run(
            ["ip", "link", "del", self.name],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def remove_stale_taps() -> list[str]:
    """Deletes the taps ``pbl<PID>x<N>`` whose process ``PID`` is gone; returns their
    names."""
    gone = []
    for m in re.finditer(rf"^\d+: ({TAP_PREFIX}(\d+)x\d+)[:@]", _ip("-o", "link", "show"), re.M):
        if not os.path.exists(f"/proc/{m.group(2)}"):
            subprocess.run(["ip", "link", "del", m.group(1)], capture_output=True, check=False)
            gone.append(m.group(1))
    return gone


def _disk_xml(disk: Disk, path: Path, machine: str) -> str:
    if disk.bus == "virtio":
        bus = "virtio"
    elif disk.bus == "ata":
        bus = "sata" if "q35" in machine else "ide"
    else:
        raise ValueError(f"disk {disk.name}: bus {disk.bus!r} is neither virtio nor ata")
    return f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(path))}/>
      <target dev='{disk.name}' bus='{bus}'/>
      <serial>pbg-{disk.name}</serial>
    </disk>"""


def guest_domain_xml(
    name: str,
    emulator: Path | str,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    disks: list[tuple[Disk, Path]],
    tap: str | None,
    serial_socket: Path,
    machine: str = "q35",
    memory_mib: int = 256,
) -> str:
    """Returns the XML of the guest's TCG domain (``type='qemu'``): the kernel booted
    directly, ``disks`` (raw files), virtio-net on the existing tap ``tap`` (None: no
    network), the serial console on a UNIX socket libvirt listens on, ACPI (the guest
    powers off through it), no USB, balloon, display or option ROM."""
    devices = "".join(_disk_xml(d, p, machine) for d, p in disks)
    if tap is not None:
        devices += f"""
    <interface type='ethernet'>
      <mac address='{MAC}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"""
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(str(emulator))}</emulator>{devices}
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(serial_socket))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest(Guest):
    """The guest as libvirt domain ``name`` of ``daemon`` (module docstring); a context
    manager that destroys the domain and deletes the tap. ``config.qemu`` is the
    domain's emulator (an absolute path); ``extra_args`` and ``env`` are not supported."""

    def __init__(
        self,
        daemon: Libvirtd,
        name: str,
        image: GuestImage,
        workdir: Path,
        config: GuestConfig | None = None,
    ) -> None:
        super().__init__(image, workdir, config)
        if self.config.extra_args or self.config.env:
            raise ValueError("a libvirt domain takes no extra QEMU options or environment")
        self.daemon = daemon
        self.name = name
        self.tap: HostTap | None = None
        self.pid = 0  # QEMU's, once started
        self._pid_started = ""
        self.serial_socket = workdir / "serial.sock"
        self.qemu_log = daemon.qemu_log_path(name)
        self._serial: socket.socket | None = None

    def kernel_command_line(self) -> str:
        if self.tap is None:
            return kernel_command_line(self.config)
        return kernel_command_line(self.config, self.tap.host_addr, self.tap.guest_addr)

    def domain_xml(self) -> str:
        """Returns the domain's XML (the tap made first when there is network)."""
        c = self.config
        emulator = shutil.which(c.qemu) or c.qemu
        return guest_domain_xml(
            self.name,
            Path(emulator).resolve(),
            kernel=self.workdir / "vmlinuz",
            initrd=self.workdir / "initrd",
            cmdline=self.kernel_command_line(),
            disks=[(d, self.disk_path(d.name)) for d in c.disks],
            tap=self.tap.name if self.tap is not None else None,
            serial_socket=self.serial_socket,
            machine=c.machine,
            memory_mib=c.memory_mb,
        )

    def start(self) -> LibvirtGuest:
        """Makes the disks and the tap, defines the domain, starts it paused, connects the
        serial console, resumes it; returns self (the guest is booting)."""
        c = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in c.disks:
            with self.disk_path(d.name).open("wb") as f:
                f.truncate(c.disk_mb << 20)
        shutil.copyfile(self.image.kernel, self.workdir / "vmlinuz")
        shutil.copyfile(self.image.initrd, self.workdir / "initrd")
        try:
            if c.net:
                self.tap = HostTap.create()
                self.peer = Peer(self.tap.udp_socket())
            xml = self.workdir / f"{self.name}.xml"
            xml.write_text(self.domain_xml())
            self.daemon.virsh("define", str(xml))
            self.daemon.virsh("start", "--paused", self.name)
            self.pid = self.daemon.qemu_pid(self.name)
            self._pid_started = _start_time(self.pid)
            self._serial = socket.socket(socket.AF_UNIX)
            self._serial.connect(str(self.serial_socket))
            self._serial_out = self.serial_path.open("wb")
            self._reader = threading.Thread(
                target=self._read_serial,
                args=(self._serial.makefile("rb"), None),
                name="guest-serial",
                daemon=True,
            )
            self._reader.start()
            self.started = time.monotonic()
            self.daemon.virsh("resume", self.name)
        except BaseException:
            self.close()
            raise
        return self

    def alive(self) -> bool:
        return bool(self.pid) and _start_time(self.pid) == self._pid_started

    def qmp_status(self) -> str:
        """Returns QMP query-status's ``status``, asked through libvirt's monitor."""
        answer = json.loads(self.daemon.qmp(self.name, '{"execute":"query-status"}'))
        status: str = answer["return"]["status"]
        return status

    def stop(self, timeout: float = 120) -> GuestLog:
        """Ends the loop (the peer answers STOP), waits for SUMMARY and for the domain to
        end (the guest powers off, libvirt ends QEMU); returns the log."""
        if self.peer is not None:
            self.peer.request_stop()
        self.wait_for("SUMMARY", lambda log: log.summary() is not None, timeout)
        deadline = time.monotonic() + 60
        while self.alive():
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU still running 60 s after SUMMARY{self._tail()}")
            time.sleep(0.2)
        if self._reader is not None:
            self._reader.join(10)
        return self.snapshot()

    def close(self) -> None:
        """Destroys and undefines the domain, ends the peer, deletes the tap, whatever
        state they are in."""
        for command in ("destroy", "undefine"):
            try:
                self.daemon.virsh(command, self.name, timeout=60)
            except (LibvirtError, subprocess.TimeoutExpired):
                pass
        if self._serial is not None:
            try:
                self._serial.shutdown(socket.SHUT_RDWR)  # wakes the reader
            except OSError:
                pass
        super().close()
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self.tap is not None:
            self.tap.delete()
            self.tap = None

    def __enter__(self) -> LibvirtGuest:
        return self.start()
