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
from typing import Any

import pytest
from qemuutil import BIN, fixed_patch, run

from helpers import ROOT, as_nobody

sys.path.append(str(ROOT / "scripts"))

from libvirtd import Libvirtd, domain_xml, libvirtd_missing

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

VM = "pb-web-01"
PATCHED = " (live-patched under libvirt)"


@pytest.fixture(scope="session")
def libvirt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a /var/cache/libvirt for every daemon of the session (probes once)."""
    return tmp_path_factory.mktemp("libvirt-cache")


@pytest.fixture()
def libvirtd(tmp_path: Path, libvirt_cache: Path) -> Iterator[Libvirtd]:
    why = libvirtd_missing()
    if why:
        pytest.skip(why)
    work = tmp_path / "libvirt"
    work.mkdir()
    d = Libvirtd(work, cache=libvirt_cache)
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
    package: str = json.loads(d.qmp(VM, '{"execute":"query-version"}'))["return"]["package"]
    return package


def version_patch(qemu_exe: Path, tmp: Path) -> Path:
    """Returns the patch ``version``: query-version's package becomes PATCHED."""
    return fixed_patch(
        qemu_exe,
        tmp,
        "monitor/qmp-cmds-control.c",
        old="info->package = g_strdup(QEMU_PKGVERSION);",
        new=f'info->package = g_strdup("{PATCHED}");',
        function="qmp_query_version",
        name="version",
    )


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
    # libvirt's default: a mount namespace of the domain's own (a private /dev).
    assert libvirtd.proc is not None
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{libvirtd.proc.pid}/ns/mnt")

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
        check=False,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert as_qemu.returncode == 0, as_qemu.stderr
    assert int(json.loads(as_qemu.stdout)["pid"]) == pid

    before = package(libvirtd)
    pbx = version_patch(qemu_exe, tmp_path)
    applied = run(BIN / "patchbox", "apply", "--all", "--vm", VM, "--json", pbx)
    assert [(r["pid"], r["result"]) for r in json.loads(applied.stdout)] == [(pid, "applied")]
    assert package(libvirtd) == PATCHED
    assert libvirtd.virsh("domstate", VM).strip() == "running"

    run(BIN / "patchbox", "remove", "--all", "--vm", VM, "version")
    assert package(libvirtd) == before
    assert libvirtd.virsh("domstate", VM).strip() == "running"
    assert libvirtd.qemu_pid(VM) == pid
    assert os.path.exists(f"/proc/{pid}")


def rollout(tmp: Path, variables: dict[str, object]) -> tuple[int, dict[str, Any], str]:
    """Runs the collection's rollout playbook on localhost (local connection, the
    collection from the checkout's ansible/); returns its exit status, localhost's record
    of the JSON report and the output."""
    cols = tmp / "collections"
    link = cols / "ansible_collections" / "patchbox" / "live"
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(ROOT / "ansible")
    report = tmp / "report"
    (report / "rollout.json").unlink(missing_ok=True)
    vars_file = tmp / "vars.json"
    vars_file.write_text(
        json.dumps({"patchbox_report_dir": str(report), "patchbox_settle_delay": 1, **variables})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(cols),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_NOCOLOR="1",
    )
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "patchbox.live.rollout", "-i", "localhost,"]
        + ["-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"]
        + ["-e", f"@{vars_file}"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert (report / "rollout.json").is_file(), out
    rows = json.loads((report / "rollout.json").read_text())
    return proc.returncode, rows, out


def test_ansible_rollout_to_a_libvirt_domain_with_a_qmp_check(
    libvirtd: Libvirtd, qemu_exe: Path, tmp_path: Path
) -> None:
    pid = libvirtd.define_and_start(VM, domain_xml(VM, qemu_exe))
    before = package(libvirtd)
    pbx = version_patch(qemu_exe, tmp_path)
    staging = tmp_path / "staging"  # made by the role: root's, 0700
    common = {
        "patchbox_patch": str(pbx),
        "patchbox_vms": [VM],
        "patchbox_staging_dir": str(staging),
        "patchbox_health_qmp_domain": VM,
        "patchbox_health_libvirt_uri": libvirtd.uri,
    }
    # The health check sees the patch through libvirt's monitor.
    rc, report, out = rollout(
        tmp_path,
        {
            **common,
            "patchbox_health_qmp_command": "query-version",
            "patchbox_health_qmp_expect": {"package": PATCHED},
        },
    )
    assert rc == 0, out
    assert package(libvirtd) == PATCHED
    assert "live-patched under libvirt" in json.dumps(report), report
    # Out again (the role only rolls out), the domain still runs.
    run(BIN / "patchbox", "remove", "--all", "--vm", VM, "version")
    assert package(libvirtd) == before
    assert libvirtd.virsh("domstate", VM).strip() == "running"
    assert libvirtd.qemu_pid(VM) == pid
    # A failing QMP expectation fails the host and rolls the patch back.
    rc, report, out = rollout(
        tmp_path,
        {
            **common,
            "patchbox_health_qmp_command": "query-version",
            "patchbox_health_qmp_expect": {"package": "not what it answers"},
        },
    )
    assert rc != 0, out
    assert "expected 'not what it answers'" in json.dumps(report), report
    assert package(libvirtd) == before
    assert libvirtd.virsh("domstate", VM).strip() == "running"


def test_socket_directory_of_libvirt_qemu_through_qemu_env(
    libvirtd: Libvirtd, qemu_exe: Path, world_dir: Path
) -> None:
    """The alternative to the abstract address: a directory of libvirt-qemu's own (0700)
    named to QEMU with <qemu:env>; the agent binds there (a directory of its euid is
    trusted), root finds the socket by path, nobody cannot even reach it."""
    import pwd

    qemu_user = pwd.getpwnam("libvirt-qemu")
    sock_dir = world_dir / "qemu"
    sock_dir.mkdir(mode=0o700)
    os.chown(sock_dir, qemu_user.pw_uid, qemu_user.pw_gid)
    xml = domain_xml(VM, qemu_exe, env={"PATCHBOX_SOCK_DIR": str(sock_dir)})
    pid = libvirtd.define_and_start(VM, xml)
    sock = sock_dir / f"sandbox-sock{pid}"
    st = sock.lstat()
    assert (st.st_uid, st.st_mode & 0o777) == (qemu_user.pw_uid, 0o600)
    assert "listening on @patchbox" not in libvirtd.qemu_log(VM)
    rows = json.loads(run(BIN / "patchbox", "ps", "--vm", VM, "--json").stdout)
    assert [(r["pid"], r["socket"], r["error"]) for r in rows] == [(pid, str(sock), "")]
    refused = as_nobody(BIN / "patchbox", "info", "-s", sock, check=False)
    assert refused.returncode != 0 and "ermission denied" in refused.stderr, refused
    info = json.loads(run(BIN / "patchbox", "info", "-p", pid, "--json").stdout)
    assert int(info["pid"]) == pid
    assert libvirtd.virsh("domstate", VM).strip() == "running"


DEBIAN_QEMU = Path("/usr/bin/qemu-system-x86_64")


@pytest.mark.parametrize("seccomp", ["libvirt's default", "seccomp_sandbox = 0"])
def test_attach_to_debians_qemu_under_libvirt(
    tmp_path: Path, libvirt_cache: Path, seccomp: str
) -> None:
    """The other route: Debian's own QEMU as the emulator and `patchbox attach`. libvirt
    starts it with `-sandbox on,...` (qemu.conf's seccomp_sandbox, on by default), and
    attach refuses a process under a seccomp filter, leaving it untouched; with
    seccomp_sandbox = 0 attach loads the agent, on its abstract address too."""
    why = libvirtd_missing() or ("" if DEBIAN_QEMU.exists() else f"{DEBIAN_QEMU}: missing")
    if why:
        pytest.skip(why)
    work = tmp_path / "libvirt"
    work.mkdir()
    d = Libvirtd(
        work, "seccomp_sandbox = 0\n" if seccomp.startswith("seccomp") else "", libvirt_cache
    )
    d.start()
    try:
        pid = d.define_and_start(VM, domain_xml(VM, DEBIAN_QEMU))
        status = Path(f"/proc/{pid}/status").read_text()
        attach = subprocess.run(
            [str(BIN / "patchbox"), "attach", "-p", str(pid)],
            check=False,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        if seccomp.startswith("seccomp"):
            assert "Seccomp:\t0" in status
            assert attach.returncode == 0, attach.stderr
            assert f"agent @patchbox/sandbox-sock{pid}" in attach.stdout
            assert "self-test passed" in run(BIN / "patchbox", "test", "-p", pid).stdout
            rows = json.loads(run(BIN / "patchbox", "ps", "--vm", VM, "--json").stdout)
            assert [(r["pid"], r["vm"]) for r in rows] == [(pid, VM)]
        else:
            assert "Seccomp:\t2" in status and "-sandbox" in d.qemu_log(VM)
            assert attach.returncode == 1 and "seccomp filter" in attach.stderr, attach
        assert d.virsh("domstate", VM).strip() == "running"
        assert json.loads(d.qmp(VM, '{"execute":"query-status"}'))["return"]["running"]
    finally:
        d.stop()
