"""QEMU device probes of the SCSI controllers: lsi53c895a (CVE-2023-0330), esp/am53c974
(CVE-2024-24474), scsi-disk MODE SELECT (CVE-2023-42467).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.
"""

from __future__ import annotations

from .harness import Probe

__all__ = ["PROBES"]

PROBES: dict[str, Probe] = {}
