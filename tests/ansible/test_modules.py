"""Modules patchbox.live.patch and patch_info over ssh on three managed hosts (tier
`ansible`). Every host runs its own target processes; their answers are read before and
after, so the tests see behaviour change, not only module output."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from controller import Controller
from fleet import Build, HostTarget, LibraryBuild, corrupt_padding

from helpers import BIN

pytestmark = pytest.mark.ansible

BEFORE, AFTER = "41", "42"  # use_helper(4) unpatched, patched
REMOTE_PATCH = "/var/tmp/helper.pbx"


def answers(targets: dict[str, list[HostTarget]]) -> dict[str, list[str]]:
    return {h: [t.call("use_helper", 4) for t in ts] for h, ts in targets.items()}


def everywhere(value: str, targets: dict[str, list[HostTarget]]) -> dict[str, list[str]]:
    return {h: [value] * len(ts) for h, ts in targets.items()}


def put_patch(fleet: Controller, patch: Path) -> None:
    """Puts the patch file at REMOTE_PATCH on every host (its /var/tmp)."""
    for h in fleet.fleet.hosts:
        shutil.copy(patch, h.scratch / Path(REMOTE_PATCH).name)


def by_pid(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for p in result["processes"]}


def test_patch_info_reports_each_hosts_own_processes(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    info = fleet.adhoc("fleet", "patchbox.live.patch_info")
    assert info.rc == 0, info.output
    for h, ts in targets.items():
        r = info[h]
        assert r["changed"] is False
        # Its own PID namespace: exactly this host's targets, with the host's pids.
        assert sorted(p["pid"] for p in r["processes"]) == sorted(t.pid for t in ts)
        for p in r["processes"]:
            assert p["build_id"] == builds["build_id"]
            assert p["exe"] == str(builds["exe"])
            assert p["patches"] == [] and p["installed"] == [] and p["error"] == ""
        assert r["ansible_facts"]["patchbox_processes"] == r["processes"]
        assert r["installed"] == [] and r["store"] == "/var/lib/patchbox"


def test_check_mode_predicts_and_touches_nothing(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    check = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH}, check=True)
    assert check.rc == 0, check.output
    for h, ts in targets.items():
        r = check[h]
        assert r["changed"] is True
        assert {p["pid"] for p in r["processes"]} == {t.pid for t in ts}
        assert {p["result"] for p in r["processes"]} == {"applied"}
        assert all(p["reason"].startswith("check mode") for p in r["processes"])
    assert answers(targets) == everywhere(BEFORE, targets)
    info = fleet.adhoc("fleet", "patchbox.live.patch_info")
    assert all(p["patches"] == [] for r in info.results.values() for p in r["processes"])
    # installed in check mode: the store stays empty.
    check = fleet.adhoc(
        "h1", "patchbox.live.patch", {"src": REMOTE_PATCH, "state": "installed"}, check=True
    )
    assert check.rc == 0 and check["h1"]["store"]["changed"] is True, check.output
    assert list(fleet.fleet.host("h1").store.iterdir()) == []


def test_present_is_idempotent_and_absent_restores(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    first = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH})
    assert first.rc == 0, first.output
    for h, ts in targets.items():
        r = first[h]
        assert r["changed"] is True and r["summary"]["applied"] == len(ts)
        assert {p["result"] for p in r["processes"]} == {"applied"}
        assert r["patch"]["name"] == "helper" and r["patch"]["build_id"] == builds["build_id"]
    assert answers(targets) == everywhere(AFTER, targets)

    second = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH})
    assert second.rc == 0, second.output
    for r in second.results.values():
        assert r["changed"] is False
        assert {(p["result"], p["reason"]) for p in r["processes"]} == {
            ("skipped", "helper is already applied")
        }
    # Check mode after the fact predicts no change either.
    check = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH}, check=True)
    assert all(r["changed"] is False for r in check.results.values()), check.output

    gone = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH, "state": "absent"})
    assert gone.rc == 0, gone.output
    assert all(r["changed"] is True for r in gone.results.values())
    assert answers(targets) == everywhere(BEFORE, targets)
    again = fleet.adhoc("fleet", "patchbox.live.patch", {"name": "helper", "state": "absent"})
    assert again.rc == 0 and all(r["changed"] is False for r in again.results.values())


def test_pids_narrow_to_those_processes(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    one, other = targets["h1"]
    r = fleet.adhoc("h1", "patchbox.live.patch", {"src": REMOTE_PATCH, "pids": [one.pid]})
    assert r.rc == 0, r.output
    assert [(p["pid"], p["result"]) for p in r["h1"]["processes"]] == [(one.pid, "applied")]
    assert one.call("use_helper", 4) == AFTER and other.call("use_helper", 4) == BEFORE
    back = fleet.adhoc("h1", "patchbox.live.patch", {"name": "helper", "state": "absent"})
    assert back.rc == 0 and by_pid(back["h1"])[one.pid]["result"] == "removed", back.output
    assert by_pid(back["h1"])[other.pid]["result"] == "skipped"


def test_vms_narrow_to_those_qemus(
    fleet: Controller, program: Build, targets: dict[str, list[HostTarget]], tmp_path: Path
) -> None:
    """Two QEMUs on h1 (the program under QEMU's name, started with -name as libvirt
    starts QEMU): `vms` narrows `patch` and `patch_info` to the QEMU of that VM; `absent`
    narrowed so leaves the store alone; the other processes of the build are not
    touched."""
    put_patch(fleet, program["patch"])
    h1 = fleet.fleet.host("h1")
    copy = tmp_path / "qemu-system-x86_64"
    shutil.copy2(program["exe"], copy)  # the same build
    qemu = fleet.fleet.install_app(copy)
    vm1 = HostTarget(h1, qemu, args=["-name", "guest=vm1,debug-threads=on"]).start()
    vm2 = HostTarget(h1, qemu, args=["-name", "guest=vm2,debug-threads=on"]).start()
    try:
        args = {"src": REMOTE_PATCH, "state": "installed", "vms": ["vm1"]}
        r = fleet.adhoc("h1", "patchbox.live.patch", args)
        assert r.rc == 0, r.output
        rows = [(p["pid"], p["result"], p["vm"]) for p in r["h1"]["processes"]]
        assert rows == [(vm1.pid, "applied", "vm1")] and r["h1"]["targets"] == [vm1.pid]
        assert vm1.call("use_helper", 4) == AFTER and vm2.call("use_helper", 4) == BEFORE
        assert [t.call("use_helper", 4) for t in targets["h1"]] == [BEFORE, BEFORE]

        info = fleet.adhoc("h1", "patchbox.live.patch_info", {"vms": ["vm2", "vm1"]})
        assert info.rc == 0, info.output
        listed = {p["pid"]: (p["vm"], p["patches"]) for p in info["h1"]["processes"]}
        assert listed == {vm1.pid: ("vm1", ["helper"]), vm2.pid: ("vm2", [])}

        args = {"src": REMOTE_PATCH, "state": "absent", "vms": ["vm1"]}
        gone = fleet.adhoc("h1", "patchbox.live.patch", args)
        assert gone.rc == 0, gone.output
        assert [(p["pid"], p["result"]) for p in gone["h1"]["processes"]] == [(vm1.pid, "removed")]
        assert gone["h1"]["store"] is None and list(h1.store.iterdir()) != []
        assert vm1.call("use_helper", 4) == BEFORE
    finally:
        vm1.stop()
        vm2.stop()


def test_failure_carries_the_agents_reason(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    bad, good = targets["h2"]
    corrupt_padding(bad, fleet.fleet.host("h2").app_dir / "target")
    r = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH})
    assert r.rc == 2, r.output  # a host failed
    h2 = r["h2"]  # (the tree callback leaves "failed" out of what it writes)
    assert f"pid {bad.pid}" in h2["msg"] and "EXPECTED_MISMATCH" in h2["msg"], h2["msg"]
    rows = by_pid(h2)
    assert rows[bad.pid]["result"] == "failed" and rows[good.pid]["result"] == "applied"
    assert r["h1"]["summary"]["applied"] == 2 and r["h3"]["summary"]["applied"] == 2
    assert bad.call("use_helper", 4) == BEFORE and good.call("use_helper", 4) == AFTER
    # With rollback, one refusal leaves every process of the host as it was.
    back = fleet.adhoc("h2", "patchbox.live.patch", {"name": "helper", "state": "absent"})
    assert back.rc == 0, back.output
    r = fleet.adhoc("h2", "patchbox.live.patch", {"src": REMOTE_PATCH, "rollback": True})
    assert r.rc == 2 and by_pid(r["h2"])[good.pid]["result"] == "removed", r.output
    assert "rolled back" in by_pid(r["h2"])[good.pid]["reason"]
    assert good.call("use_helper", 4) == BEFORE


def test_installed_goes_into_that_hosts_store(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    args = {"src": REMOTE_PATCH, "state": "installed"}
    first = fleet.adhoc("h1", "patchbox.live.patch", args)
    assert first.rc == 0, first.output
    store = first["h1"]["store"]
    assert store["changed"] is True and store["entry"]["name"] == "helper"
    h1, h2 = fleet.fleet.host("h1"), fleet.fleet.host("h2")
    (stored,) = (h1.store / builds["build_id"]).glob("*-helper.pbx")
    assert stored.read_bytes() == builds["patch"].read_bytes()
    assert list(h2.store.iterdir()) == []  # another host's store
    assert [t.call("use_helper", 4) for t in targets["h1"]] == [AFTER, AFTER]
    assert [t.call("use_helper", 4) for t in targets["h2"]] == [BEFORE, BEFORE]

    second = fleet.adhoc("h1", "patchbox.live.patch", args)
    assert second.rc == 0 and second["h1"]["changed"] is False, second.output
    info = fleet.adhoc("h1", "patchbox.live.patch_info")["h1"]
    assert [e["name"] for e in info["installed"]] == ["helper"]
    assert all(p["installed"] == ["helper"] for p in info["processes"])

    gone = fleet.adhoc("h1", "patchbox.live.patch", {"src": REMOTE_PATCH, "state": "absent"})
    assert gone.rc == 0 and gone["h1"]["store"]["changed"] is True, gone.output
    assert list((h1.store / builds["build_id"]).iterdir()) == []
    assert [t.call("use_helper", 4) for t in targets["h1"]] == [BEFORE, BEFORE]


def test_trust_rule_holds(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    put_patch(fleet, builds["patch"])
    (fleet.fleet.host("h3").scratch / "keys").mkdir()  # a trust directory with no key
    r = fleet.adhoc(
        "h3", "patchbox.live.patch", {"src": REMOTE_PATCH, "trust_dir": "/var/tmp/keys"}
    )
    assert r.rc == 2 and r["h3"]["changed"] is False, r.output
    assert "signed" in r["h3"]["msg"], r["h3"]["msg"]
    assert [t.call("use_helper", 4) for t in targets["h3"]] == [BEFORE, BEFORE]
    # A trust directory anyone can write to chooses nothing: refused, naming it.
    (fleet.fleet.host("h3").scratch / "keys").chmod(0o777)
    r = fleet.adhoc(
        "h3", "patchbox.live.patch", {"src": REMOTE_PATCH, "trust_dir": "/var/tmp/keys"}
    )
    assert r.rc == 2 and r["h3"]["changed"] is False, r.output
    assert "/var/tmp/keys is writable by others (owner uid 0, mode 0777)" in r["h3"]["msg"]
    assert [t.call("use_helper", 4) for t in targets["h3"]] == [BEFORE, BEFORE]


def test_missing_patchbox_is_reported(
    fleet: Controller, targets: dict[str, list[HostTarget]]
) -> None:
    r = fleet.adhoc(
        "h1",
        "patchbox.live.patch_info",
        extra=["-e", "ansible_python_interpreter=/usr/bin/python3"],
    )
    assert r.rc == 2 and "patchbox" in r["h1"]["msg"], r.output
    assert "ansible_python_interpreter" in r["h1"]["msg"]


def test_a_process_without_agent_is_unreachable(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """A third process of the build on h1 runs with its agent disabled: `present`
    patches the other two, reports it `unreachable` with the reason and fails h1 (the
    other hosts are patched); `patch_info` lists it; `absent` reports it again."""
    put_patch(fleet, builds["patch"])
    h1 = fleet.fleet.host("h1")
    exe = builds["exe"]
    assert isinstance(exe, Path)
    dark = HostTarget(h1, exe, env={"PATCHBOX_DISABLE": "1"}).start(agent=False)
    try:
        r = fleet.adhoc("fleet", "patchbox.live.patch", {"src": REMOTE_PATCH})
        assert r.rc == 2, r.output
        rows = by_pid(r["h1"])
        assert rows[dark.pid]["result"] == "unreachable", rows
        assert rows[dark.pid]["reason"].startswith("agent present but no socket")
        assert f"pid {dark.pid} unreachable: agent present but no socket" in r["h1"]["msg"]
        assert r["h1"]["summary"] == {
            "applied": 2,
            "removed": 0,
            "skipped": 0,
            "failed": 0,
            "unreachable": 1,
        }
        assert sorted(r["h1"]["targets"]) == sorted(t.pid for t in targets["h1"])
        assert r["h2"]["summary"]["applied"] == 2 and r["h2"]["summary"]["unreachable"] == 0
        assert [t.call("use_helper", 4) for t in targets["h1"]] == [AFTER, AFTER]
        assert dark.call("use_helper", 4) == BEFORE

        info = fleet.adhoc("h1", "patchbox.live.patch_info")
        assert info.rc == 0, info.output
        row = by_pid(info["h1"])[dark.pid]
        assert row["error"].startswith("agent present but no socket") and row["patches"] == []

        gone = fleet.adhoc("h1", "patchbox.live.patch", {"src": REMOTE_PATCH, "state": "absent"})
        assert gone.rc == 2, gone.output
        rows = by_pid(gone["h1"])
        assert rows[dark.pid]["result"] == "unreachable"
        assert {rows[t.pid]["result"] for t in targets["h1"]} == {"removed"}
    finally:
        dark.stop()


def test_library_patch_reaches_every_process_mapping_it(
    fleet: Controller, library: LibraryBuild, targets: dict[str, list[HostTarget]]
) -> None:
    """A library's patch goes to every process that maps the library (two programs of
    their own), and `absent` with the patch file (narrowed to the library's build-id)
    takes it out of both again; the targets of another program are skipped."""
    h1 = fleet.fleet.host("h1")
    shutil.copy(library["patch"], h1.scratch / "libfix.pbx")
    users = [HostTarget(h1, exe).start() for exe in library["users"]]
    try:
        assert [u.call("lib_answer", 4) for u in users] == ["41", "41"]
        r = fleet.adhoc("h1", "patchbox.live.patch", {"src": "/var/tmp/libfix.pbx"})
        assert r.rc == 0, r.output
        rows = by_pid(r["h1"])
        assert {rows[u.pid]["result"] for u in users} == {"applied"}
        assert {rows[t.pid]["result"] for t in targets["h1"]} == {"skipped"}
        assert sorted(r["h1"]["targets"]) == sorted(u.pid for u in users)
        assert [u.call("lib_answer", 4) for u in users] == ["42", "42"]
        gone = fleet.adhoc(
            "h1", "patchbox.live.patch", {"src": "/var/tmp/libfix.pbx", "state": "absent"}
        )
        assert gone.rc == 0, gone.output
        assert {by_pid(gone["h1"])[u.pid]["result"] for u in users} == {"removed"}
        assert [u.call("lib_answer", 4) for u in users] == ["41", "41"]
    finally:
        for u in users:
            u.stop()


def _module_pids(python: Path) -> list[int]:
    """Returns the pids of module processes running now on a managed host: the hosts'
    interpreter ``python`` (ansible pipelines the module into it; the hosts' PID
    namespaces are children of ours, so they are listed here too)."""
    out = []
    want = os.fsencode(python)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0 == want:
            out.append(int(proc.name))
    return out


def test_module_killed_at_random_instants(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """The patch module on h1 SIGKILLed at random instants of its run, 12 times: every
    target of h1 whole (patched or not) as patch_info says, and the next run completes."""
    put_patch(fleet, builds["patch"])
    rng = random.Random(19)
    hits = 0
    for _ in range(12):
        cmd = [str(BIN / "ansible"), "h1", "-m", "patchbox.live.patch", "-a"]
        proc = subprocess.Popen(
            [*cmd, f'{{"src": "{REMOTE_PATCH}"}}'],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=fleet.env(),
            cwd=fleet.base,
        )
        # Wait for the module to start on h1, then kill it a random moment later.
        deadline = time.monotonic() + 60
        while not (pids := _module_pids(fleet.host_python)) and proc.poll() is None:
            assert time.monotonic() < deadline, "the module never started"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                hits += 1
            except ProcessLookupError:
                pass
        proc.wait(120)
        info = fleet.adhoc("h1", "patchbox.live.patch_info")
        assert info.rc == 0, info.output
        listed = {p["pid"]: p["patches"] for p in info["h1"]["processes"]}
        for t in targets["h1"]:
            answer = t.call("use_helper", 4)
            assert answer in (BEFORE, AFTER)
            assert (answer == AFTER) == (listed[t.pid] == ["helper"]), (answer, listed)
        done = fleet.adhoc("h1", "patchbox.live.patch", {"src": REMOTE_PATCH})
        assert done.rc == 0, done.output
        assert [t.call("use_helper", 4) for t in targets["h1"]] == [AFTER] * len(targets["h1"])
        undo = fleet.adhoc("h1", "patchbox.live.patch", {"src": REMOTE_PATCH, "state": "absent"})
        assert undo.rc == 0, undo.output
    assert hits > 0  # some kill landed while the module ran
