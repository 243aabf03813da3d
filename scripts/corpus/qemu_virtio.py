"""QEMU device probes of virtio devices: virtio-crypto (CVE-2023-3180), virtio-net
transmit (CVE-2023-6693), virtio-9p (CVE-2023-2861).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), the way upstream's reproducer of the CVE does.
"""

from __future__ import annotations

from .harness import Probe

__all__ = ["PROBES"]

PROBES: dict[str, Probe] = {}
