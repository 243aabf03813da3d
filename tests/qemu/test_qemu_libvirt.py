"""The project's QEMU under Debian's libvirt (tiers `qemu` and `libvirt`, root): libvirt
starts it as libvirt-qemu with a cleaned environment; its agent, refused by the
root-owned directory beside the executable, listens on @patchbox/sandbox-sock<pid>;
root finds it by the domain's name, patches it, the change is seen through libvirt's
own QMP monitor, and taken back, while the domain stays running (docs/qemu.md, "Under
libvirt")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemuutil import BIN, fixed_patch, run

from helpers import ROOT, as_nobody

sys.path.append(str(ROOT / "scripts"))

from libvirtd import Libvirtd, domain_xml, libvirtd_missing  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

VM = "pb-web-01"
PATCHED = " (live-patched under libvirt)"


@pytest.fixture()
def libvirtd(tmp_path: Path) -> Iterator[Libvirtd]:
    why = libvirtd_missing()
    if why:
        pytest.skip(why)
    work = tmp_path / "libvirt"
    work.mkdir()
    d = Libvirtd(work)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def ids(pid: int) -> dict[str, list[int]]:
    """Returns the Uid and Gid lines of /proc/PID/status (real, effective, saved, fs)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            out[key] = [int(v) for v in value.split()]
    return out


def package(d: Libvirtd) -> str:
    """Returns query-version's package, asked through libvirt's QMP monitor."""
    return json.loads(d.qmp(VM, '{"execute":"query-version"}'))["return"]["package"]


def test_patch_a_libvirt_domain_through_its_name(
    libvirtd: Libvirtd, qemu_exe: Path, tmp_path: Path
) -> None:
    import pwd

    qemu_user = pwd.getpwnam("libvirt-qemu")
    pid = libvirtd.define_and_start(VM, domain_xml(VM, qemu_exe))
    assert libvirtd.virsh("domstate", VM).strip() == "running"
    # How libvirt started it: its own user, not root; no PATCHBOX_* reaches it.
    assert ids(pid)["Uid"] == [qemu_user.pw_uid] * 4
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [e for e in env if e.startswith(b"PATCHBOX_")]
    assert f"-name\0guest={VM},debug-threads=on" in Path(f"/proc/{pid}/cmdline").read_text()

    # The root-owned directory beside the executable refuses libvirt-qemu: the agent
    # said so on QEMU's stderr (libvirt's log of the domain) and listens on its
    # abstract address, which root finds by the domain's name.
    assert f"listening on @patchbox/sandbox-sock{pid} instead" in libvirtd.qemu_log(VM)
    rows = json.loads(run(BIN / "patchbox", "ps", "--vm", VM, "--json").stdout)
    assert [(r["pid"], r["vm"], r["socket"], r["error"]) for r in rows] == [
        (pid, VM, f"@patchbox/sandbox-sock{pid}", "")
    ]

    # Anyone in the network namespace may connect to the abstract address; the agent
    # serves only whom the kernel would let ptrace QEMU: root, not another user.
    sock = f"@patchbox/sandbox-sock{pid}"
    refused = as_nobody(BIN / "patchbox", "info", "-s", sock, check=False)
    assert refused.returncode != 0 and "[PERMISSION]" in refused.stderr, refused
    # QEMU's own user is served, as the kernel would let it ptrace QEMU: libvirt changed
    # the ids before exec, so the QEMU image is dumpable.
    as_qemu = subprocess.run(
        ["setpriv", "--reuid=libvirt-qemu", "--regid=libvirt-qemu", "--clear-groups"]
        + [str(BIN / "patchbox"), "info", "-s", sock, "--json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert as_qemu.returncode == 0, as_qemu.stderr
    assert int(json.loads(as_qemu.stdout)["pid"]) == pid

    before = package(libvirtd)
    pbx = fixed_patch(
        qemu_exe,
        tmp_path,
        "monitor/qmp-cmds-control.c",
        "info->package = g_strdup(QEMU_PKGVERSION);",
        f'info->package = g_strdup("{PATCHED}");',
        "qmp_query_version",
        "version",
    )
    applied = run(BIN / "patchbox", "apply", "--all", "--vm", VM, "--json", pbx)
    assert [(r["pid"], r["result"]) for r in json.loads(applied.stdout)] == [(pid, "applied")]
    assert package(libvirtd) == PATCHED
    assert libvirtd.virsh("domstate", VM).strip() == "running"

    run(BIN / "patchbox", "remove", "--all", "--vm", VM, "version")
    assert package(libvirtd) == before
    assert libvirtd.virsh("domstate", VM).strip() == "running"
    assert libvirtd.qemu_pid(VM) == pid
    assert os.path.exists(f"/proc/{pid}")
