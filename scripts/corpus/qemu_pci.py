"""QEMU device probes of PCI devices: sdhci-pci (CVE-2024-3447), nvme SR-IOV
(CVE-2024-26327/8), ICH9 AHCI (CVE-2023-5088), vhost-vdpa (CVE-2023-3301).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.

vhost-vdpa (CVE-2023-3301) has no probe: a vhost-vdpa netdev needs a vDPA device
(/dev/vhost-vdpa-N), and this machine's kernel has none (fixes.py says why).
"""

from __future__ import annotations

import struct
import time

from .harness import Ctx, Probe
from .load.qmp_client import QMP
from .load.qtest_client import QTest, QTestError

__all__ = ["PROBES"]

# --- sdhci-pci: TRNMOD while Command Inhibit (DAT) (CVE-2024-3447) ---------------------------

SDHCI_ID = (0x1B36, 0x0007)  # Red Hat's sdhci-pci
SDHCI_BAR = 0xE0000000  # BAR 0 (the SD host registers), in the pc machine's PCI hole
BLKSIZE, BLKCNT, TRNMOD, PRNSTS, CLKCON, SWRST = 0x04, 0x06, 0x0C, 0x24, 0x2C, 0x2F
TRNS_BLK_CNT_EN, TRNS_MULTI = 0x02, 0x20
CMD_DATA_PRESENT = 0x20  # command register: a data transfer follows (no response)
DATA_INHIBIT = 0x02  # present state: Command Inhibit (DAT)

SDHCI_MACHINE = (
    *("-machine", "pc", "-m", "64"),
    *("-device", "sdhci-pci,sd-spec-version=3", "-device", "sd-card,drive=sd0"),
    *("-drive", "if=none,id=sd0,file=null-co://,format=raw"),
)


def _sdhci_trnmod_inhibit(ctx: Ctx) -> str:
    """Starts a multi-block PIO write (CMD0 with Data Present, two blocks of 512 bytes),
    which sets Command Inhibit (DAT) and waits for the guest to fill the buffer, then
    writes 0 to the Transfer Mode register alone (16 bits) and reads it back. Unfixed,
    sdhci_write takes the new mode in the middle of the transfer (what lets a guest turn
    a transfer into a buffer overrun); fixed, TRNMOD keeps its bits while DAT is
    inhibited. Nothing is written to the data port, so the unfixed QEMU survives it. A
    software reset (all) ends the transfer. Upstream: commit 9e4b27ca6b ("hw/sd/sdhci: Do
    not update TRNMOD when Command Inhibit (DAT) is set"), whose reproducer changes
    TRNMOD mid-transfer and then overruns the FIFO through the data port; the machine is
    tests/qtest/fuzz-sdcard-test.c's."""
    with QTest(ctx.extra["qtest"]) as q:
        dev = q.find_device(*SDHCI_ID)
        q.map_bar(dev, 0, SDHCI_BAR)
        reg = SDHCI_BAR
        q.write(1, reg + SWRST, 0x01)  # reset all: a clean controller
        try:
            q.write(2, reg + CLKCON, 0x0005)  # internal clock and SD clock on
            q.write(2, reg + BLKSIZE, 0x200)
            q.write(2, reg + BLKCNT, 2)
            mode = TRNS_MULTI | TRNS_BLK_CNT_EN
            q.write(4, reg + TRNMOD, mode | CMD_DATA_PRESENT << 16)  # CMD0, data present
            before = q.read(2, reg + TRNMOD)
            if not q.read(4, reg + PRNSTS) & DATA_INHIBIT:
                return f"Command Inhibit (DAT) not set after a data command (TRNMOD {before:#x})"
            q.write(2, reg + TRNMOD, 0)
            after = q.read(2, reg + TRNMOD)
        finally:
            q.write(1, reg + SWRST, 0x01)
    verb = "kept" if after == before else "changed"
    return f"TRNMOD {verb} under Command Inhibit (DAT): {before:#x}, 0 written, reads {after:#x}"


# --- nvme SR-IOV: NumVFs > TotalVFs (CVE-2024-26327, CVE-2024-26328) --------------------------

NVME_ID = (0x1B36, 0x0010)  # Red Hat's nvme
NVME_SLOT = 4
ECAM = 0xB0000000  # q35's MMCONFIG window (MCH PCIEXBAR, its default base)
MCH_PCIEXBAR, PCIEXBAREN = 0x60, 0x1
EXT_CAP_SRIOV = 0x0010
SRIOV_CTRL, SRIOV_TOTAL_VF, SRIOV_NUM_VF = 0x08, 0x0E, 0x10
SRIOV_CTRL_VFE = 0x1

NVME_MACHINE = (
    *("-machine", "q35", "-m", "128", "-device", "nvme-subsys,id=nvmesubsys0"),
    # SR-IOV with 2 VFs: the smallest flexible resources nvme_check_params takes.
    "-device",
    f"nvme,serial=pbxsriov,subsys=nvmesubsys0,bus=pcie.0,addr={NVME_SLOT:#x},"
    "sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=6,msix_qsize=3",
)


def _ecam(dev: int, off: int, fn: int = 0) -> int:
    """Returns the address of config space offset ``off`` of 0:dev.fn in the ECAM window."""
    return ECAM | dev << 15 | fn << 12 | off


def _sriov_cap(q: QTest, dev: int) -> int:
    """Returns the offset of the SR-IOV extended capability of ``dev`` (0: none)."""
    off = 0x100
    for _ in range(64):  # bounded: a corrupt chain must not loop
        header = q.read(4, _ecam(dev, off))
        if header & 0xFFFF == EXT_CAP_SRIOV:
            return off
        off = header >> 20
        if off < 0x100:
            break
    return 0


def _functions(qmp: str, slot: int) -> list[int]:
    """Returns the functions of bus 0's ``slot`` other than 0 (the VFs), by query-pci."""
    q = QMP(qmp)
    try:
        buses = q.cmd("query-pci")["return"]
    finally:
        q.close()
    return sorted(
        d["function"]
        for b in buses
        if b["bus"] == 0
        for d in b["devices"]
        if d["slot"] == slot and d["function"]
    )


# The PF's admin queue, driven the way a guest's nvme driver does (NVMe 1.4: 3.1, 7.6.1),
# for the secondary controllers' resources (Identify CNS 14h/15h, Virtualization
# Management) that CVE-2024-26328's half changes.
NVME_BAR = 0xC0000000  # BAR 0 of the PF (q35: above the ECAM window, below the IOAPIC)
NVME_CC, NVME_CSTS, NVME_AQA, NVME_ASQ, NVME_ACQ, NVME_SQ0TDBL = (
    0x14,
    0x1C,
    0x24,
    0x28,
    0x30,
    0x1000,
)
NVME_CC_ENABLE = 0x00460001  # EN, IOSQES 6, IOCQES 4, 4 KiB pages, NVM command set
ASQ, ACQ, DATA, ADMIN_DEPTH = 0x100000, 0x101000, 0x102000, 16  # in guest RAM
PCIE_CAP_DEVCTL, DEVCTL_BCR_FLR = 0x80 + 0x08, 0x8000  # nvme's PCIe capability is at 0x80
ADM_IDENTIFY, ADM_VIRT_MNGMT = 0x06, 0x1C
CNS_PRIMARY_CTRL_CAP, CNS_SECONDARY_CTRL_LIST = 0x14, 0x15
VIRT_PRM_ALLOC, VIRT_SEC_ASSIGN = 0x01, 0x08
RES_VQ, RES_VI = 0, 1


class _NvmeAdmin:
    """The admin submission and completion queues of one nvme controller, over qtest."""

    def __init__(self, q: QTest, dev: int) -> None:
        self.q, self.dev = q, dev
        self.tail = self.head = 0
        self.phase = 1
        self.cid = 0

    def enable(self) -> None:
        """Maps BAR 0, resets the controller and enables it with empty admin queues."""
        q = self.q
        q.map_bar(self.dev, 0, NVME_BAR)
        q.cfg_write(self.dev, 0x14, 0)  # BAR 0 is 64-bit: its high half
        q.write(4, NVME_BAR + NVME_CC, 0)
        q.memwrite(ACQ, bytes(16 * ADMIN_DEPTH))
        q.write(4, NVME_BAR + NVME_AQA, (ADMIN_DEPTH - 1) << 16 | (ADMIN_DEPTH - 1))
        q.write(8, NVME_BAR + NVME_ASQ, ASQ)
        q.write(8, NVME_BAR + NVME_ACQ, ACQ)
        q.write(4, NVME_BAR + NVME_CC, NVME_CC_ENABLE)
        self.tail = self.head = 0
        self.phase = 1
        if q.read(4, NVME_BAR + NVME_CSTS) & 0x3 != 0x1:
            raise QTestError(f"nvme not ready: CSTS {q.read(4, NVME_BAR + NVME_CSTS):#x}")

    def disable(self) -> None:
        self.q.write(4, NVME_BAR + NVME_CC, 0)

    def cmd(self, opcode: int, cdw10: int, cdw11: int = 0, prp1: int = 0) -> int:
        """Submits one admin command and returns its status field (0: success)."""
        q = self.q
        self.cid += 1
        sqe = struct.pack("<BBHI", opcode, 0, self.cid & 0xFFFF, 0) + bytes(16)
        sqe += struct.pack("<QQ", prp1, 0) + struct.pack("<II", cdw10, cdw11) + bytes(16)
        q.memwrite(ASQ + 64 * self.tail, sqe)
        self.tail = (self.tail + 1) % ADMIN_DEPTH
        q.write(4, NVME_BAR + NVME_SQ0TDBL, self.tail)
        for _ in range(100):  # bounded: the completion is posted by a bottom half
            dw3: int = struct.unpack("<I", q.memread(ACQ + 16 * self.head + 12, 4))[0]
            if dw3 >> 16 & 1 == self.phase:
                self.head = (self.head + 1) % ADMIN_DEPTH
                self.phase ^= self.head == 0
                q.write(4, NVME_BAR + NVME_SQ0TDBL + 4, self.head)
                return dw3 >> 17
            q.clock_step(1000)
        raise QTestError(f"nvme admin command {opcode:#x} never completed")

    def identify(self, cns: int) -> bytes:
        status = self.cmd(ADM_IDENTIFY, cns, prp1=DATA)
        if status:
            raise QTestError(f"nvme identify CNS {cns:#x}: status {status:#x}")
        return self.q.memread(DATA, 4096)

    def secondary(self) -> tuple[int, int, int]:
        """Returns (controller id, VQ resources, VI resources) of the first secondary
        controller (Identify CNS 15h)."""
        entry = struct.unpack_from("<HHB3xHHH", self.identify(CNS_SECONDARY_CTRL_LIST), 32)
        return entry[0], entry[4], entry[5]


def _give_secondary_resources(q: QTest, dev: int) -> tuple[_NvmeAdmin, int]:
    """Gives the first secondary controller 2 flexible queue and 1 interrupt resources:
    first takes the PF's flexible resources off it (Virtualization Management, primary
    allocate 0, effective at the next FLR), then assigns them. Returns the admin queue
    (controller enabled) and the secondary controller's id."""
    admin = _NvmeAdmin(q, dev)
    admin.enable()
    vqrfap, virfap = struct.unpack_from("<H30xH", admin.identify(CNS_PRIMARY_CTRL_CAP), 40)
    if vqrfap or virfap:
        cntlid = struct.unpack_from("<H", admin.identify(CNS_PRIMARY_CTRL_CAP))[0]
        for rt in (RES_VQ, RES_VI):
            status = admin.cmd(ADM_VIRT_MNGMT, VIRT_PRM_ALLOC | rt << 8 | cntlid << 16, 0)
            if status:
                raise QTestError(f"primary allocate {rt}: status {status:#x}")
        devctl = q.cfg_read(dev, PCIE_CAP_DEVCTL, 2)
        q.cfg_write(dev, PCIE_CAP_DEVCTL, devctl | DEVCTL_BCR_FLR, 2)  # function reset
        admin.enable()
    scid = admin.secondary()[0]
    for rt, nr in ((RES_VQ, 2), (RES_VI, 1)):
        status = admin.cmd(ADM_VIRT_MNGMT, VIRT_SEC_ASSIGN | rt << 8 | scid << 16, nr)
        if status:
            raise QTestError(f"secondary assign {rt} {nr}: status {status:#x}")
    return admin, scid


def _nvme_sriov_numvfs(ctx: Ctx) -> str:
    """Two observations, one per half of the fix.

    pcie_sriov (CVE-2024-26327): enables the ECAM window of q35 (qtest runs no firmware
    to do it), finds the nvme PF's SR-IOV capability (0x120, past the 256 bytes of the
    0xcf8 ports), writes NumVFs = TotalVFs + 1, sets VF Enable and counts the VFs on the
    PF's slot with QMP query-pci. Unfixed, register_vfs registers TotalVFs + 1 VFs (the
    last one takes a secondary controller entry nvme never reserved, controller id 0:
    the PF's); NumVFs past nvme's 127 entries reads beyond that array (NumVFs 200 on the
    level: an assertion in nvme_update_msixcap_ts aborts QEMU), which this probe does
    not do, so the unfixed QEMU lives on. Fixed, register_vfs refuses NumVFs > TotalVFs:
    no VF. VF Enable and NumVFs are cleared after, which unregisters what was registered.

    nvme (CVE-2024-26328): gives the first secondary controller flexible resources
    through the PF's admin queue, then, with no VF enabled, writes NumVFs = TotalVFs + 1
    and a Control without VF Enable. Unfixed, nvme_pci_write_config takes the guest's
    NumVFs for the number of VFs going away and sets that many secondary controllers
    offline, freeing their resources (past nvme's 127 entries: an out-of-bounds read);
    fixed, it counts the VFs really registered (none): the resources stay. Identify
    (CNS 15h) reads them back; a controller reset after frees them.

    Upstream: commits 6081b4243c ("pcie_sriov: Validate NumVFs") and 91bb64a8d2
    ("hw/nvme: Use pcie_sriov_num_vfs()"), which carry no reproducer."""
    with QTest(ctx.extra["qtest"]) as q:
        q.cfg_write(0, MCH_PCIEXBAR, ECAM | PCIEXBAREN)
        dev = q.find_device(*NVME_ID)
        cap = _sriov_cap(q, dev)
        if not cap:
            return f"no SR-IOV capability on 0:{dev:02x}.0"
        sriov = _ecam(dev, cap)
        total = q.read(2, sriov + SRIOV_TOTAL_VF)
        try:
            q.write(2, sriov + SRIOV_NUM_VF, total + 1)
            q.write(2, sriov + SRIOV_CTRL, SRIOV_CTRL_VFE)
            vfs = _functions(ctx.extra["qmp"], dev)
        finally:
            q.write(2, sriov + SRIOV_CTRL, 0)
            q.write(2, sriov + SRIOV_NUM_VF, 0)
        seen = f"NumVFs {total + 1} > TotalVFs {total}, VF Enable: {len(vfs)} VF(s) {vfs}"
        admin, scid = _give_secondary_resources(q, dev)
        try:
            q.write(2, sriov + SRIOV_NUM_VF, total + 1)
            q.write(2, sriov + SRIOV_CTRL, 0)
            _, nvq, nvi = admin.secondary()
        finally:
            q.write(2, sriov + SRIOV_NUM_VF, 0)
            admin.disable()  # a controller reset: the secondary controllers' resources go
    kept = "kept" if nvq and nvi else "freed"
    return f"{seen}; controller {scid}'s resources {kept} (VQ {nvq}, VI {nvi}) by no VF Enable"


# --- AHCI: an HBA reset with a DMA write pending (CVE-2023-5088) ----------------------------

AHCI_DEV, AHCI_FN = 0x1F, 2  # q35's built-in ICH9 AHCI, 00:1f.2
AHCI_BAR = 0xC0000000  # BAR 5 (ABAR, the HBA's registers), in q35's PCI hole
AHCI_GHC, GHC_HR, GHC_AE = 0x04, 1 << 0, 1 << 31
AHCI_P0 = 0x100  # port 0's registers
PX_CLB, PX_FB, PX_IS, PX_CMD, PX_SERR, PX_CI = 0x00, 0x08, 0x10, 0x18, 0x30, 0x38
PX_CMD_ST, PX_CMD_FRE = 0x01, 0x10
ATA_READ_DMA_EXT, ATA_WRITE_DMA_EXT = 0x25, 0x35
# In guest RAM: command list, received FISes, command table (slot 0), two data buffers.
AHCI_CLB, AHCI_FB, AHCI_CT, AHCI_BUF1, AHCI_BUF2 = 0x100000, 0x100400, 0x101000, 0x102000, 0x103000
AHCI_BUFSIZE = 4096  # 8 sectors
AHCI_BPS_WRITE = AHCI_BUFSIZE * 3 // 2  # upstream's throttle: a second 4 KiB write waits ~0.6 s
PATTERN1, PATTERN2 = 0xAA, 0xBB

AHCI_MACHINE = (
    *("-machine", "q35", "-m", "128"),
    # null-co under a temporary qcow2 overlay (snapshot=on): a disk that keeps what is
    # written, deleted with QEMU. The throttle is the -drive's (its clock real time; a
    # throttle group made later under qtest runs on the virtual clock, which would stop
    # the fixed ide_bus_reset's synchronous cancel for ever).
    "-drive",
    "if=none,id=pbxahci,driver=null-co,size=1M,read-zeroes=on,snapshot=on,"
    f"throttling.bps-write={AHCI_BPS_WRITE}",
    *("-device", "ide-hd,drive=pbxahci,bus=ide.0"),
)


class _AhciPort:
    """Port 0 of q35's AHCI, one command slot, driven the way libqos/ahci.c does."""

    def __init__(self, q: QTest) -> None:
        self.q = q
        q.map_bar(AHCI_DEV, 5, AHCI_BAR, fn=AHCI_FN)

    def reg(self, off: int, value: int | None = None) -> int:
        if value is None:
            return self.q.read(4, AHCI_BAR + off)
        self.q.write(4, AHCI_BAR + off, value)
        return value

    def start(self) -> None:
        """Enables AHCI mode and starts port 0's FIS receive and command engines."""
        self.reg(AHCI_GHC, GHC_AE)
        self.reg(AHCI_P0 + PX_CMD, 0)
        for off, addr in ((PX_CLB, AHCI_CLB), (PX_FB, AHCI_FB)):
            self.reg(AHCI_P0 + off, addr)
            self.reg(AHCI_P0 + off + 4, 0)
        self.reg(AHCI_P0 + PX_SERR, 0xFFFFFFFF)
        self.reg(AHCI_P0 + PX_IS, 0xFFFFFFFF)
        self.reg(AHCI_P0 + PX_CMD, PX_CMD_FRE)
        self.reg(AHCI_P0 + PX_CMD, PX_CMD_FRE | PX_CMD_ST)

    def issue(self, command: int, lba: int, buf: int) -> None:
        """Issues a DMA command (LBA48) of AHCI_BUFSIZE bytes at ``buf`` in slot 0."""
        write = 0x40 if command == ATA_WRITE_DMA_EXT else 0
        header = struct.pack("<IIQ", 5 | write | 1 << 16, 0, AHCI_CT) + bytes(16)  # 1 PRD
        fis = struct.pack("<BBBB", 0x27, 0x80, command, 0)  # H2D register FIS, C bit
        fis += (lba & 0xFFFFFF).to_bytes(3, "little") + b"\x40"  # LBA mode
        fis += (lba >> 24).to_bytes(3, "little") + b"\0"
        fis += struct.pack("<H", AHCI_BUFSIZE // 512) + bytes(2)
        prd = struct.pack("<QII", buf, 0, AHCI_BUFSIZE - 1)
        self.q.memwrite(AHCI_CLB, header)
        self.q.memwrite(AHCI_CT, fis.ljust(0x80, b"\0") + prd)
        self.reg(AHCI_P0 + PX_CI, 1)

    def busy(self) -> bool:
        return bool(self.reg(AHCI_P0 + PX_CI) & 1)

    def wait(self, seconds: float = 10) -> None:
        """Waits (bounded) for slot 0's command to complete."""
        end = time.monotonic() + seconds
        while self.busy():
            if time.monotonic() > end:
                raise QTestError(f"AHCI command not completed in {seconds} s")
            self.q.clock_step(1_000_000)
            time.sleep(0.005)


def _ide_reset_pending_dma(ctx: Ctx) -> str:
    """Upstream's test_reset_pending_callback (tests/qtest/ahci-test.c), over qtest: writes
    pattern 1 to sectors 0-7 (which fills the -drive's write throttle), issues a write of
    pattern 2 to sectors 8-15 (held by the throttle), resets the HBA (GHC.HR) while it is
    pending, drains the block layer (QMP stop and cont: any write still queued completes),
    then restarts the port and reads sectors 0-7 and 8-15 back.

    Unfixed, ide_bus_reset resets the IDE state first and cancels the DMA after; the
    cancel waits for the write, whose callback (ide_dma_cb) then runs on the reset state
    (1 sector left, LBA 0) and writes the first 512 bytes of the stale command's buffer
    to sector 0: sector 0 reads pattern 2. That write goes to this probe's own temporary
    disk from this probe's own buffer, so the unfixed QEMU is run. Fixed, the DMA is
    cancelled first (its callback completes the command on a state still valid): sector
    0 keeps pattern 1. Either way sectors 8-15 get pattern 2. Upstream: commits
    7d7512019f ("hw/ide: reset: cancel async DMA operation before resetting state") and
    cc610857bb ("tests/qtest: ahci-test: add test exposing reset issue with pending
    callback")."""
    with QTest(ctx.extra["qtest"]) as q:
        port = _AhciPort(q)
        port.start()
        q.memwrite(AHCI_BUF1, bytes([PATTERN1]) * AHCI_BUFSIZE)
        q.memwrite(AHCI_BUF2, bytes([PATTERN2]) * AHCI_BUFSIZE)
        port.issue(ATA_WRITE_DMA_EXT, 0, AHCI_BUF1)
        port.wait()
        port.issue(ATA_WRITE_DMA_EXT, AHCI_BUFSIZE // 512, AHCI_BUF2)
        pending = port.busy()
        port.reg(AHCI_GHC, GHC_AE | GHC_HR)  # returns once the cancel has waited for it
        if not pending:
            return "inconclusive: the write to sectors 8-15 completed before the HBA reset"
        qmp = QMP(ctx.extra["qmp"])
        try:
            for cmd in ("stop", "cont"):  # vm_stop drains every block device
                if "return" not in (ans := qmp.cmd(cmd)):
                    return f"inconclusive: QMP {cmd}: {ans}"
        finally:
            qmp.close()
        port.start()
        got = []
        for lba, buf in ((0, AHCI_BUF1), (AHCI_BUFSIZE // 512, AHCI_BUF2)):
            q.memwrite(buf, bytes(AHCI_BUFSIZE))
            port.issue(ATA_READ_DMA_EXT, lba, buf)
            port.wait()
            got.append(q.memread(buf, AHCI_BUFSIZE))
    sector0, rest = got[0][:512], got[0][512:]
    others = f"sectors 1-7 {_fill(rest)}, sectors 8-15 {_fill(got[1])}"
    if sector0 == bytes([PATTERN1]) * 512:
        return f"sector 0 kept {PATTERN1:#x} after an HBA reset with a write pending; {others}"
    return (
        f"sector 0 overwritten with {_fill(sector0)} (the pending write's data: "
        f"{PATTERN2:#x}) after an HBA reset with a write pending; {others}"
    )


def _fill(data: bytes) -> str:
    """Names the byte ``data`` is filled with, or says it is mixed."""
    return f"{data[0]:#x}" if data == data[:1] * len(data) else f"mixed ({data[:4].hex()}...)"


PROBES: dict[str, Probe] = {
    "qemu_sdhci_trnmod_inhibit": Probe(
        _sdhci_trnmod_inhibit,
        lambda s: s.startswith("TRNMOD kept"),
        expected="TRNMOD keeps its value while Command Inhibit (DAT) is set",
        machine=SDHCI_MACHINE,
    ),
    "qemu_nvme_sriov_numvfs": Probe(
        _nvme_sriov_numvfs,
        lambda s: " 0 VF(s) " in s and "resources kept" in s,
        expected="no VF registered when NumVFs exceeds TotalVFs; clearing VF Enable with "
        "no VF keeps the secondary controllers' resources",
        machine=NVME_MACHINE,
    ),
    "qemu_ide_reset_pending_dma": Probe(
        _ide_reset_pending_dma,
        lambda s: s.startswith("sector 0 kept") and "sectors 8-15 0xbb" in s,
        expected="an AHCI reset cancels the pending DMA before resetting the IDE state: "
        "sector 0 keeps its data",
        machine=AHCI_MACHINE,
    ),
}
