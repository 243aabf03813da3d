"""A client of QEMU's qtest protocol: the device probes' stand-in for a guest driver.

QEMU started with ``-accel qtest -qtest unix:PATH,server=on,wait=off`` runs no guest CPU;
a client of that socket reads and writes guest memory, I/O ports and MMIO, one text line per
access (``writel 0xfe000000 0x1``, answered ``OK`` or ``OK 0x...``; ``FAIL ...`` on error),
the way upstream's qtest reproducers of these CVEs drive a device. The device code that
runs is the same as under a guest's driver: the accesses go through the memory API into the
device's MMIO and PIO handlers, and DMA reads the memory written here.

Lines QEMU sends unasked (``IRQ raise N`` after ``irq_intercept_in``) are skipped.
"""

from __future__ import annotations

import socket

__all__ = ["QTest", "QTestError"]

PCI_ADDR, PCI_DATA = 0xCF8, 0xCFC


class QTestError(RuntimeError):
    """QEMU answered FAIL, or closed the connection."""


class QTest:
    """One connection to QEMU's qtest socket."""

    def __init__(self, path: str, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")

    def __enter__(self) -> QTest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def cmd(self, line: str) -> str:
        """Sends one command; returns the words after ``OK`` (raises QTestError on FAIL)."""
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        while True:
            ans = self.f.readline()
            if not ans:
                raise QTestError(f"QEMU closed the qtest socket after {line!r}")
            text = ans.decode().strip()
            if text.startswith("IRQ "):
                continue
            if text == "OK" or text.startswith("OK "):
                return text[3:]
            raise QTestError(f"{line!r}: {text}")

    # --- port and memory accesses -------------------------------------------------------

    def out(self, size: int, port: int, value: int) -> None:
        self.cmd(f"out{'bwl'[size.bit_length() - 1]} {port:#x} {value:#x}")

    def inp(self, size: int, port: int) -> int:
        return int(self.cmd(f"in{'bwl'[size.bit_length() - 1]} {port:#x}"), 16)

    def write(self, size: int, addr: int, value: int) -> None:
        """Writes ``size`` (1, 2, 4, 8) bytes at guest physical ``addr`` (an MMIO access)."""
        self.cmd(f"write{'bwlq'[size.bit_length() - 1]} {addr:#x} {value:#x}")

    def read(self, size: int, addr: int) -> int:
        return int(self.cmd(f"read{'bwlq'[size.bit_length() - 1]} {addr:#x}"), 16)

    def memwrite(self, addr: int, data: bytes) -> None:
        """Writes guest memory (DMA buffers, descriptors): qtest's ``write`` command."""
        if data:
            self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def memread(self, addr: int, size: int) -> bytes:
        """Reads guest memory: qtest's ``read`` command (answered ``OK 0x<hex>``)."""
        return bytes.fromhex(self.cmd(f"read {addr:#x} {size:#x}").removeprefix("0x"))

    def clock_step(self, ns: int | None = None) -> int:
        """Advances the virtual clock (by ``ns``, or to the next timer); returns its value."""
        return int(self.cmd("clock_step" + (f" {ns}" if ns is not None else "")))

    # --- PCI configuration space (mechanism #1, ports 0xcf8/0xcfc) -----------------------

    @staticmethod
    def _cfg(dev: int, fn: int, off: int, bus: int = 0) -> int:
        return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (off & 0xFC)

    def cfg_read(self, dev: int, off: int, size: int = 4, fn: int = 0) -> int:
        self.out(4, PCI_ADDR, self._cfg(dev, fn, off))
        return self.inp(size, PCI_DATA + (off & 3))

    def cfg_write(self, dev: int, off: int, value: int, size: int = 4, fn: int = 0) -> None:
        self.out(4, PCI_ADDR, self._cfg(dev, fn, off))
        self.out(size, PCI_DATA + (off & 3), value)

    def find_device(self, vendor: int, device: int) -> int:
        """Returns the slot of the first function 0 on bus 0 with that vendor:device id."""
        for dev in range(32):
            if self.cfg_read(dev, 0) == device << 16 | vendor:
                return dev
        raise QTestError(f"no PCI device {vendor:04x}:{device:04x} on bus 0")

    def map_bar(self, dev: int, bar: int, addr: int, fn: int = 0) -> None:
        """Places BAR ``bar`` at ``addr`` (I/O or memory, as the BAR is) and enables the
        device's I/O, memory and bus-master bits."""
        self.cfg_write(dev, 0x10 + 4 * bar, addr, fn=fn)
        cmd = self.cfg_read(dev, 0x04, 2, fn=fn)
        self.cfg_write(dev, 0x04, cmd | 0x7, 2, fn=fn)
