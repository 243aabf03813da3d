"""QEMU device probes of the SCSI controllers: lsi53c895a (CVE-2023-0330), esp/am53c974
(CVE-2024-24474), scsi-disk MODE SELECT (CVE-2023-42467).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.
"""

from __future__ import annotations

import struct

from .harness import Ctx, Probe
from .load.qtest_client import QTest, QTestError

__all__ = ["PROBES"]

# --- lsi53c895a: a SCRIPTS program that re-starts itself (CVE-2023-0330) ------------------

_LSI = (0x1000, 0x0012)  # LSI53C895A vendor:device
_LSI_MMIO, _LSI_RAM = 0xFF100000, 0xFF000000  # BAR 1 (registers), BAR 2 (SCRIPTS RAM)
_LSI_ISTAT0, _LSI_ISTAT1, _LSI_DSTAT, _LSI_SIST0, _LSI_DSP = 0x14, 0x15, 0x0C, 0x42, 0x2C
_LSI_SRST = 0x40  # ISTAT0: software reset
_LSI_SHOWN = (
    ("ISTAT0", _LSI_ISTAT0),
    ("ISTAT1", _LSI_ISTAT1),
    ("DSTAT", _LSI_DSTAT),
    ("SIST0", _LSI_SIST0),
)  # read after the run (DSTAT and SIST0 clear on read)


def _lsi_check(ctx: Ctx) -> str:
    """Returns whether QEMU survived a SCRIPTS program that DMAs into the LSI's own
    registers and so restarts itself, with the registers it left.

    Upstream's reproducer (tests/qtest/fuzz-lsi53c895a-test.c: test_lsi_dma_reentrancy,
    issue #1563). Unfixed, each pass calls lsi_execute_script one level deeper until the
    stack overflows: QEMU dies of SIGSEGV (seen on the corpus level), hence
    ``on_unfixed=False``. Fixed, the ninth nested call stops: the carved 7.2.3 fix raises
    an unexpected-disconnect interrupt (SIST0 UDC, 0x04, SRUN clear); 7.2.22's later
    rework instead parks the SCRIPTS on a timer (ISTAT1 SRUN, 0x02, still set), which a
    chip reset here cancels. Either way QEMU answers."""
    mmio = _LSI_MMIO
    try:
        with QTest(ctx.extra["qtest"]) as qt:
            dev = qt.find_device(*_LSI)
            qt.map_bar(dev, 1, mmio)
            qt.map_bar(dev, 2, _LSI_RAM)
            qt.write(1, mmio + _LSI_ISTAT0, _LSI_SRST)  # a clean chip, whatever ran before
            qt.write(1, mmio + _LSI_ISTAT0, 0)
            # At RAM+0 a memory move of 0x24 bytes from RAM+0x114 to the registers 0x14..:
            # ISTAT0 = ABRT stops the SCRIPTS, then DSP = RAM+0 starts them again, one
            # lsi_execute_script deeper per pass.
            qt.write(4, _LSI_RAM + 0x114, 0x80)
            qt.write(4, _LSI_RAM + 0x100 + _LSI_DSP, _LSI_RAM)
            qt.memwrite(_LSI_RAM, struct.pack("<III", 0xC0000024, _LSI_RAM + 0x114, mmio + 0x14))
            qt.write(1, mmio + _LSI_DSP + 3, _LSI_RAM >> 24)  # DSP[24:31]: start
            regs = {name: qt.read(1, mmio + off) for name, off in _LSI_SHOWN}
            dsp = qt.read(4, mmio + _LSI_DSP)
            qt.write(1, mmio + _LSI_ISTAT0, _LSI_SRST)  # stop what is left (and its timer)
            qt.write(1, mmio + _LSI_ISTAT0, 0)
    except (QTestError, OSError) as err:
        return f"QEMU died running the self-restarting SCRIPTS: {err}"
    shown = " ".join(f"{k}={v:#04x}" for k, v in regs.items())
    return f"QEMU survived the self-restarting SCRIPTS ({shown} DSP={dsp:#x})"


# --- am53c974 (PCI ESP): the ESP core and its PCI DMA engine -------------------------------

_AM53C974 = (0x1022, 0x2020)  # AMD PCscsi vendor:device
_ESP_IO = 0xC000  # BAR 0 (I/O): ESP registers 4 bytes apart, then the DMA engine's at 0x40
_ESP_DMA_BUF = 0x100000  # guest RAM the DMA engine writes data-in to
# ESP registers (include/hw/scsi/esp.h) and commands
_TCLO, _TCMID, _FIFO, _CMD, _STAT, _INTR, _FLAGS = 0, 1, 2, 3, 4, 5, 7
_WBUSID = 4
_C_RESET, _C_BUSRESET, _C_TI, _C_ICCS, _C_MSGACC = 0x02, 0x03, 0x10, 0x11, 0x12
_C_SELATN, _C_DMA = 0x42, 0x80  # select with ATN; the DMA bit of a command
_DATA_OUT, _DATA_IN, _STATUS = 0, 1, 3  # STAT's phase bits
_PHASE = {0: "DATA OUT", 1: "DATA IN", 2: "COMMAND", 3: "STATUS", 6: "MSG OUT", 7: "MSG IN"}
# the DMA engine's registers (hw/scsi/esp-pci.c), as offsets of BAR 0
_DMA_CMD, _DMA_STC, _DMA_SPA = 0x40, 0x44, 0x48
_DMA_IDLE, _DMA_START, _DMA_FROM_DEVICE = 0x0, 0x3, 0x80

_MODE_SELECT_6, _INQUIRY, _TEST_UNIT_READY = 0x15, 0x12, 0x00
_GOOD = 0


class _Esp:
    """The am53c974's ESP core driven the way a driver does it without DMA: command and
    data-out bytes through the 16-byte FIFO, status and message read back from it."""

    def __init__(self, qt: QTest) -> None:
        self.qt = qt
        dev = qt.find_device(*_AM53C974)
        qt.map_bar(dev, 0, _ESP_IO)

    def reg(self, r: int) -> int:
        return self.qt.inp(4, _ESP_IO + 4 * r) & 0xFF

    def set(self, r: int, value: int) -> None:
        self.qt.out(4, _ESP_IO + 4 * r, value)

    def phase(self) -> int:
        return self.reg(_STAT) & 7

    def reset(self) -> None:
        """Resets the chip and the SCSI bus (cancelling a request left in flight), then
        takes the unit attention the reset leaves with TEST UNIT READY."""
        self.set(_CMD, _C_RESET)
        self.set(_CMD, _C_BUSRESET)
        self.reg(_INTR)
        for _ in range(3):
            self.select(bytes(6))
            if self.status() == _GOOD:
                return
        raise QTestError("TEST UNIT READY never answered GOOD after a bus reset")

    def select(self, cdb: bytes) -> int:
        """Selects target 0 with ATN and sends IDENTIFY (LUN 0) and ``cdb`` through the
        FIFO; returns the phase the target went to."""
        for b in b"\x80" + cdb:
            self.set(_FIFO, b)
        self.set(_WBUSID, 0)
        self.set(_CMD, _C_SELATN)
        self.reg(_INTR)
        return self.phase()

    def data_out(self, data: bytes) -> None:
        """Fills the FIFO with ``data`` and transfers it without DMA (one TI)."""
        for b in data:
            self.set(_FIFO, b)
        self.set(_CMD, _C_TI)

    def data_in(self, n: int) -> bytes:
        """Returns ``n`` bytes of data-in, by the PCI DMA engine (the ESP reads no data-in
        without DMA on this board)."""
        self.qt.memwrite(_ESP_DMA_BUF, bytes(n))
        self.qt.out(4, _ESP_IO + _DMA_SPA, _ESP_DMA_BUF)
        self.qt.out(4, _ESP_IO + _DMA_STC, n)
        self.qt.out(4, _ESP_IO + _DMA_CMD, _DMA_FROM_DEVICE | _DMA_START)
        self.set(_TCLO, n & 0xFF)
        self.set(_TCMID, n >> 8)
        self.set(_CMD, _C_DMA | _C_TI)
        self.reg(_INTR)
        self.qt.out(4, _ESP_IO + _DMA_CMD, _DMA_FROM_DEVICE | _DMA_IDLE)
        return self.qt.memread(_ESP_DMA_BUF, n)

    def status(self) -> int:
        """Returns the status byte of the command (ICCS), and accepts its message."""
        if self.phase() != _STATUS:
            raise QTestError(f"status asked in phase {_PHASE.get(self.phase())}")
        self.set(_CMD, _C_ICCS)
        status = self.reg(_FIFO)
        self.reg(_FIFO)  # the message: COMMAND COMPLETE
        self.set(_CMD, _C_MSGACC)
        self.reg(_INTR)
        return status


def _mode_select(params: bytes) -> bytes:
    """Returns the CDB of MODE SELECT(6) (PF=1) of ``params``."""
    return bytes([_MODE_SELECT_6, 0x10, 0, 0, len(params), 0])


def _esp_check(ctx: Ctx) -> str:
    """Returns how much of a full 16-byte FIFO the ESP moved into a 4-byte non-DMA
    data-out transfer (MODE SELECT(6) of a bare mode parameter header), and how the
    command ended.

    Written from the fix (upstream "esp: restrict non-DMA transfer length to that of
    available data"); 7.2's tests/qtest/am53c974-test.c has no case of it.
    Unfixed, esp_do_nodma pops the whole FIFO: all 16 bytes, 12 past the transfer's end
    (into scsi-disk's 4096-byte buffer here, so nothing is corrupted) and async_len wraps,
    so the command stays in DATA OUT. Fixed, it pops 4, 12 stay in the FIFO and the
    command completes GOOD. The closing bus reset cancels what an unfixed ESP left."""
    try:
        with QTest(ctx.extra["qtest"]) as qt:
            esp = _Esp(qt)
            esp.reset()
            params = bytes(4)  # a mode parameter header alone: no block descriptor, page
            if esp.select(_mode_select(params)) != _DATA_OUT:
                return f"MODE SELECT went to phase {_PHASE.get(esp.phase())}, not DATA OUT"
            esp.data_out(params + bytes(12))  # 16 bytes in the FIFO, 4 to transfer
            took, phase = 16 - (esp.reg(_FLAGS) & 0x1F), esp.phase()
            if phase == _STATUS:
                seen = f"took {took} of 16 FIFO bytes, status {esp.status():#04x}"
            else:
                seen = f"took {took} of 16 FIFO bytes, left in {_PHASE.get(phase)}"
            esp.reset()  # cancels the request an unfixed ESP leaves in flight
    except (QTestError, OSError) as err:
        return f"the ESP probe failed: {err}"
    return f"4-byte MODE SELECT data-out: the ESP {seen}"


def _vpd_block_size(esp: _Esp) -> int:
    """Returns the disk's logical block size as VPD page B0 shows it: its minimum I/O
    size (4096 bytes, the machine's min_io_size) in logical blocks. No division by the
    block size there can be by zero, unlike READ CAPACITY or MODE SENSE's descriptor."""
    if esp.select(bytes([_INQUIRY, 1, 0xB0, 0, 64, 0])) != _DATA_IN:
        raise QTestError(f"INQUIRY went to phase {_PHASE.get(esp.phase())}")
    page = esp.data_in(64)
    if esp.status() != _GOOD or page[1] != 0xB0:
        raise QTestError(f"INQUIRY VPD B0 failed: {page[:8].hex()}")
    granularity = int.from_bytes(page[6:8], "big")
    return 4096 // granularity if granularity else 0


def _block_size(esp: _Esp, size: int) -> int:
    """Sends MODE SELECT(6) with a block descriptor of ``size``; returns its status."""
    params = bytes([0, 0, 0, 8, 0, 0, 0, 0, 0]) + size.to_bytes(3, "big")
    if esp.select(_mode_select(params)) != _DATA_OUT:
        raise QTestError(f"MODE SELECT went to phase {_PHASE.get(esp.phase())}")
    esp.data_out(params)  # 12 bytes: within the FIFO and the transfer, as a driver does
    return esp.status()


def _mode_select_check(ctx: Ctx) -> str:
    """Returns the status of MODE SELECT(6) with a block descriptor of 256 bytes sent to a
    scsi-hd behind the am53c974, and the block size the disk then has (VPD page B0); sets
    it back to 512 before returning.

    Written from the fix (upstream "hw/scsi/scsi-disk: Disallow block sizes smaller than
    512"). Unfixed, scsi_disk_emulate_mode_select takes 256, and the next
    READ CAPACITY or MODE SENSE with a block descriptor divides by 256 / 512 = 0 (SIGFPE):
    the probe issues neither while the size is 256, and MODE SELECT of 512 undoes it.
    Fixed, the descriptor is ignored, the status is GOOD as well and the disk keeps 512."""
    try:
        with QTest(ctx.extra["qtest"]) as qt:
            esp = _Esp(qt)
            esp.reset()
            status = _block_size(esp, 256)
            size = _vpd_block_size(esp)
            restored = _block_size(esp, 512)
            if restored != _GOOD or _vpd_block_size(esp) != 512:
                return f"the block size did not return to 512 (status {restored:#04x})"
    except (QTestError, OSError) as err:
        return f"the MODE SELECT probe failed: {err}"
    return f"MODE SELECT of block size 256: status {status:#04x}, block size then {size}"


def _machine(*devices: str) -> tuple[str, ...]:
    """Returns the QEMU arguments of a q35 machine with a null-co disk ``disk0`` (no file:
    it reads zeroes, drops writes) and ``devices``."""
    args = ["-machine", "q35", "-m", "64"]
    args += ["-blockdev", "driver=null-co,node-name=disk0,read-zeroes=on"]
    for dev in devices:
        args += ["-device", dev]
    return tuple(args)


PROBES: dict[str, Probe] = {
    "qemu_lsi_dma_reentrancy": Probe(
        _lsi_check,
        lambda seen: seen.startswith("QEMU survived"),
        on_unfixed=False,
        expected="QEMU survives the self-restarting SCRIPTS",
        machine=_machine("lsi53c895a", "scsi-cd,drive=disk0"),
    ),
    "qemu_esp_nodma_length": Probe(
        _esp_check,
        lambda seen: seen.endswith("took 4 of 16 FIFO bytes, status 0x00"),
        expected="the ESP takes 4 of 16 FIFO bytes and the command completes GOOD",
        machine=_machine("am53c974", "scsi-hd,drive=disk0,scsi-id=0"),
    ),
    "qemu_scsi_mode_select_256": Probe(
        _mode_select_check,
        lambda seen: seen.endswith("block size then 512"),
        expected="a block size of 256 is not taken: the disk keeps 512",
        machine=_machine("am53c974", "scsi-hd,drive=disk0,scsi-id=0,min_io_size=4096"),
    ),
}
