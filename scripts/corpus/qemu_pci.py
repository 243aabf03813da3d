"""QEMU device probes of PCI devices: sdhci-pci (CVE-2024-3447), nvme SR-IOV
(CVE-2024-26327/8), vhost-vdpa (CVE-2023-3301).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.

vhost-vdpa (CVE-2023-3301) has no probe: a vhost-vdpa netdev needs a vDPA device
(/dev/vhost-vdpa-N), and this machine's kernel has none (fixes.py says why).
"""

from __future__ import annotations

from .harness import Ctx, Probe
from .load.qmp_client import QMP
from .load.qtest_client import QTest

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


def _nvme_sriov_numvfs(ctx: Ctx) -> str:
    """Enables the ECAM window of q35 (qtest runs no firmware to do it), finds the nvme
    PF's SR-IOV capability (0x120, past the 256 bytes of the 0xcf8 ports), writes
    NumVFs = TotalVFs + 1 and sets VF Enable, then counts the VFs on the PF's slot with
    QMP query-pci. Unfixed, register_vfs registers TotalVFs + 1 VFs (the last one takes
    a secondary controller entry nvme never reserved, controller id 0: the PF's); with
    a NumVFs past nvme's 127 entries it reads and writes beyond the array, which this
    probe does not do, so the unfixed QEMU lives on. Fixed, register_vfs refuses NumVFs
    > TotalVFs: no VF. VF Enable and NumVFs are cleared after, which unregisters what
    was registered (nvme_pci_write_config, CVE-2024-26328's half, runs on each write).
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
    return f"NumVFs {total + 1} > TotalVFs {total}, VF Enable: {len(vfs)} VF(s) registered {vfs}"


PROBES: dict[str, Probe] = {
    "qemu_sdhci_trnmod_inhibit": Probe(
        _sdhci_trnmod_inhibit,
        lambda s: s.startswith("TRNMOD kept"),
        expected="TRNMOD keeps its value while Command Inhibit (DAT) is set",
        machine=SDHCI_MACHINE,
    ),
    "qemu_nvme_sriov_numvfs": Probe(
        _nvme_sriov_numvfs,
        lambda s: " 0 VF(s) registered" in s,
        expected="no VF registered when NumVFs exceeds TotalVFs",
        machine=NVME_MACHINE,
    ),
}
