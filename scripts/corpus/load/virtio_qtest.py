"""A minimal virtio driver over qtest: modern virtio-pci (virtio 1.0) and split
virtqueues.

Modern rather than legacy virtio-pci because some devices (virtio-crypto-pci) exist only
as modern ones; the others take it too (``disable-legacy=on`` is not needed). The
device's virtio structures (common config, notify, ISR, device config) are found through
its vendor capabilities and their BAR is mapped by the PCI config mechanism. Each queue's
ring is laid out in guest RAM by ``memwrite`` (the descriptor table, the available ring,
the used ring on the next 4 KiB page), requests are chains of descriptors over buffers in
guest RAM, and completion is seen by polling the used ring's index with ``memread``,
bounded in time. No interrupt is used.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from .qtest_client import QTest, QTestError

__all__ = ["NEEDS_RESET", "Completion", "Virtqueue", "VirtioPci", "VirtioTimeout"]

VIRTIO_VENDOR = 0x1AF4

# The virtio structures a vendor capability (id 9) points at, in a BAR.
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG = 1, 2, 3, 4
# struct virtio_pci_common_cfg
C_DFSELECT, C_DF, C_GFSELECT, C_GF, C_STATUS = 0x00, 0x04, 0x08, 0x0C, 0x14
C_Q_SELECT, C_Q_SIZE, C_Q_ENABLE, C_Q_NOTIFY_OFF = 0x16, 0x18, 0x1C, 0x1E
C_Q_DESC, C_Q_AVAIL, C_Q_USED = 0x20, 0x28, 0x30

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
F_VERSION_1 = 1 << 32
DESC_F_NEXT, DESC_F_WRITE = 1, 2
PAGE = 4096
RING_AREA = BUF_AREA = 0x10000  # per queue, in guest RAM


class VirtioTimeout(QTestError):
    """The device did not complete a request in time."""


@dataclass
class Completion:
    """A used-ring entry: the bytes the device wrote (``len``) and the in buffers read
    back, in the order they were given."""

    written: int
    ins: list[bytes]


@dataclass
class Virtqueue:
    """One split virtqueue, its ring at ``ring`` (page aligned) and
    its buffers bump-allocated from ``bufs``."""

    dev: VirtioPci
    index: int
    size: int
    ring: int
    bufs: int
    next_avail: int = 0
    last_used: int = 0
    next_desc: int = 0
    next_buf: int = 0
    notify_addr: int = 0
    _pending: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def avail(self) -> int:
        return self.ring + 16 * self.size

    @property
    def used(self) -> int:
        return (self.avail + 6 + 2 * self.size + PAGE - 1) & ~(PAGE - 1)

    def ring_bytes(self) -> int:
        return self.used + 6 + 8 * self.size - self.ring

    def submit(self, outs: list[bytes], in_lens: list[int]) -> int:
        """Places one request (device-readable ``outs``, then device-writable buffers of
        ``in_lens`` bytes) on the available ring and notifies the device; returns its head
        descriptor index."""
        qt = self.dev.qt
        n = len(outs) + len(in_lens)
        if n > self.size:
            raise ValueError(f"{n} descriptors on a queue of {self.size}")
        head = self.next_desc if self.next_desc + n <= self.size else 0
        self.next_desc = head + n
        # (length, bytes to write or None for a device-writable buffer)
        items = [(len(b), b) for b in outs] + [(n_in, None) for n_in in in_lens]
        total = sum((length + 15) & ~15 for length, _ in items)
        if total > BUF_AREA:
            raise ValueError(f"{total} bytes of buffers in an area of {BUF_AREA}")
        if self.next_buf + total > self.bufs + BUF_AREA:
            self.next_buf = self.bufs
        addr = self.next_buf
        self.next_buf += total
        descs = b""
        ins: list[tuple[int, int]] = []
        for i, (length, data) in enumerate(items):
            if data is None:
                qt.cmd(f"memset {addr:#x} {length:#x} 0")
            else:
                qt.memwrite(addr, data)
            flags = DESC_F_NEXT if i < n - 1 else 0
            if data is None:
                ins.append((addr, length))
                flags |= DESC_F_WRITE
            descs += struct.pack("<QIHH", addr, length, flags, head + i + 1)
            addr += (length + 15) & ~15
        qt.memwrite(self.ring + 16 * head, descs)
        slot = self.next_avail % self.size
        qt.memwrite(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        qt.memwrite(self.avail + 2, struct.pack("<H", self.next_avail))
        self._pending[head] = ins
        qt.write(2, self.notify_addr, self.index)
        return head

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.dev.qt.memread(self.used + 2, 2))[0])

    def wait(self, timeout: float = 5.0) -> Completion:
        """Returns the next used-ring entry; raises VirtioTimeout after ``timeout``
        seconds without one."""
        qt = self.dev.qt
        end = time.monotonic() + timeout
        while self.used_idx() == self.last_used:
            if time.monotonic() > end:
                raise VirtioTimeout(f"queue {self.index}: no completion in {timeout} s")
            time.sleep(0.01)
        slot = self.last_used % self.size
        head, written = struct.unpack("<II", qt.memread(self.used + 4 + 8 * slot, 8))
        self.last_used = (self.last_used + 1) & 0xFFFF
        ins = self._pending.pop(head, [])
        return Completion(written, [qt.memread(a, ln) for a, ln in ins])

    def request(self, outs: list[bytes], in_lens: list[int], timeout: float = 5.0) -> Completion:
        """Submits one request and returns its completion (raises VirtioTimeout)."""
        self.submit(outs, in_lens)
        return self.wait(timeout)


class VirtioPci:
    """A modern virtio-pci device (virtio 1.0), driven through qtest: its capabilities
    found in PCI config space, the BAR they name mapped at ``bar_addr``. Guest RAM from
    ``mem`` on is the driver's: a ring area and a buffer area per queue."""

    def __init__(
        self, qt: QTest, device_id: int, bar_addr: int = 0xE0000000, mem: int = 0x100000
    ) -> None:
        self.qt = qt
        self.slot = qt.find_device(VIRTIO_VENDOR, device_id)
        self.mem = mem
        self.caps: dict[int, tuple[int, int]] = {}  # cfg_type: (bar, offset)
        self.notify_mult = 0
        ptr = qt.cfg_read(self.slot, 0x34, 1)
        while ptr:
            cap_id, nxt = qt.cfg_read(self.slot, ptr, 1), qt.cfg_read(self.slot, ptr + 1, 1)
            if cap_id == 0x09:  # vendor specific: a virtio structure
                cfg_type = qt.cfg_read(self.slot, ptr + 3, 1)
                bar = qt.cfg_read(self.slot, ptr + 4, 1)
                if cfg_type in (COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG):
                    self.caps.setdefault(cfg_type, (bar, qt.cfg_read(self.slot, ptr + 8)))
                if cfg_type == NOTIFY_CFG:
                    self.notify_mult = qt.cfg_read(self.slot, ptr + 16)
            ptr = nxt
        bars = {bar for bar, _ in self.caps.values()}
        if len(self.caps) < 4 or len(bars) != 1:
            raise QTestError(f"virtio device {device_id:#x}: capabilities {self.caps}")
        bar = bars.pop()
        if qt.cfg_read(self.slot, 0x10 + 4 * bar) & 0x4:  # 64-bit BAR: upper half 0
            qt.cfg_write(self.slot, 0x14 + 4 * bar, 0)
        qt.map_bar(self.slot, bar, bar_addr)
        self.base = {t: bar_addr + off for t, (_, off) in self.caps.items()}

    def _common(self, size: int, off: int, value: int | None = None) -> int:
        addr = self.base[COMMON_CFG] + off
        if value is None:
            return self.qt.read(size, addr)
        self.qt.write(size, addr, value)
        return value

    def status(self) -> int:
        return self._common(1, C_STATUS)

    def start(self, features: int = 0) -> int:
        """Resets the device and acknowledges it; accepts VERSION_1 and those of
        ``features`` it offers, and returns the accepted set."""
        self._common(1, C_STATUS, 0)  # reset: also clears a device marked broken
        self._common(1, C_STATUS, ACKNOWLEDGE)
        self._common(1, C_STATUS, ACKNOWLEDGE | DRIVER)
        offered = 0
        for half in (0, 1):
            self._common(4, C_DFSELECT, half)
            offered |= self._common(4, C_DF) << (32 * half)
        accepted = offered & (features | F_VERSION_1)
        for half in (0, 1):
            self._common(4, C_GFSELECT, half)
            self._common(4, C_GF, accepted >> (32 * half) & 0xFFFFFFFF)
        self._common(1, C_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not self.status() & FEATURES_OK:
            raise QTestError(f"features {accepted:#x} refused")
        return accepted

    def queue(self, index: int) -> Virtqueue:
        """Sets up and enables queue ``index`` (its ring zeroed) and returns it."""
        self._common(2, C_Q_SELECT, index)
        size = self._common(2, C_Q_SIZE)
        if not size:
            raise QTestError(f"virtio queue {index} does not exist")
        base = self.mem + index * (RING_AREA + BUF_AREA)
        vq = Virtqueue(self, index, size, base, base + RING_AREA, next_buf=base + RING_AREA)
        if vq.ring_bytes() > RING_AREA:
            raise QTestError(f"virtio queue {index}: {size} entries do not fit")
        self.qt.cmd(f"memset {base:#x} {vq.ring_bytes():#x} 0")
        for off, addr in ((C_Q_DESC, vq.ring), (C_Q_AVAIL, vq.avail), (C_Q_USED, vq.used)):
            self._common(4, off, addr & 0xFFFFFFFF)
            self._common(4, off + 4, addr >> 32)
        vq.notify_addr = self.base[NOTIFY_CFG] + self._common(2, C_Q_NOTIFY_OFF) * self.notify_mult
        self._common(2, C_Q_ENABLE, 1)
        return vq

    def driver_ok(self) -> None:
        self._common(1, C_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def config(self, off: int, size: int) -> bytes:
        """Returns ``size`` bytes of the device's config space from ``off``."""
        return bytes(self.qt.read(1, self.base[DEVICE_CFG] + off + i) for i in range(size))
