"""Playbook patchbox.live.rollout over three managed hosts (tier `ansible`): canaries first,
a health check per host, rollback where it fails, the rollout stopped past the failure
threshold, and the report on the controller. The targets' answers show what each host's
processes run afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from controller import Controller
from fleet import Build, Host, HostTarget, LibraryBuild, corrupt_padding

from helpers import AS_NOBODY

pytestmark = pytest.mark.ansible

BEFORE, AFTER = "41", "42"  # use_helper(4) unpatched, patched
HEALTH = "test ! -e /var/tmp/unhealthy"  # a host's check fails while this file exists


def answers(targets: dict[str, list[HostTarget]]) -> dict[str, list[str]]:
    return {h: [t.call("use_helper", 4) for t in ts] for h, ts in targets.items()}


def rollout(
    fleet: Controller, builds: Build | LibraryBuild, *args: str, **variables: object
) -> tuple[int, dict[str, Any], str]:
    """Runs the collection's rollout playbook; returns its exit status, the JSON report
    and the table report."""
    report = fleet.base / "report"
    for f in ("rollout.json", "rollout.txt"):
        (report / f).unlink(missing_ok=True)
    extra = {
        "patchbox_patch": str(builds["patch"]),
        "patchbox_report_dir": str(report),
        "patchbox_health_command": HEALTH,
        "patchbox_settle_delay": 1,
        **variables,
    }
    proc = fleet.playbook("patchbox.live.rollout", extra, *args)
    out = proc.stdout + proc.stderr
    assert (report / "rollout.json").is_file(), out
    return proc.returncode, json.loads((report / "rollout.json").read_text()), out


def test_rollout_over_all_hosts_then_again(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    rc, report, out = rollout(fleet, builds, patchbox_serial=[1, "100%"])
    assert rc == 0, out
    assert answers(targets) == {h: [AFTER] * len(ts) for h, ts in targets.items()}
    assert report["rollout"] == "finished" and report["check_mode"] is False
    assert report["patch"] == "helper.pbx" and report["last_batch"] == ["h2", "h3"]
    for h, ts in targets.items():
        r = report["hosts"][h]
        assert r["status"] == "patched" and r["changed"] is True
        assert sorted((p["pid"], p["result"]) for p in r["processes"]) == sorted(
            (t.pid, "applied") for t in ts
        )
        assert str(r["health"]["rc"]) == "0"
        levels = report["patch_levels"][h]
        assert sorted(p["pid"] for p in levels) == sorted(t.pid for t in ts)
        assert all(p["patches"] == ["helper"] for p in levels)
        # The patch was staged on each host: root's own 0700 directory, a 0600 file.
        staging = fleet.fleet.host(h).staging
        assert (staging.stat().st_uid, staging.stat().st_mode & 0o7777) == (0, 0o700)
        copied = staging / "helper.pbx"
        assert copied.read_bytes() == builds["patch"].read_bytes()
        assert copied.stat().st_mode & 0o777 == 0o600
    # Canary first: h1 alone, then the rest.
    assert out.index("[h1]") < out.index("[h2]")
    table = (fleet.base / "report" / "rollout.txt").read_text()
    assert "rollout of helper.pbx (state present): finished" in table
    for h, ts in targets.items():
        assert any(line.split()[:2] == [h, "patched"] for line in table.splitlines())
        for t in ts:
            assert any(line.split()[:3] == [h, str(t.pid), "helper"] for line in table.splitlines())

    # Idempotent: nothing changes the second time, every process is skipped.
    rc, report, out = rollout(fleet, builds, patchbox_serial=[1, "100%"])
    assert rc == 0, out
    for h in targets:
        r = report["hosts"][h]
        assert r["status"] == "patched" and r["changed"] is False
        assert {p["result"] for p in r["processes"]} == {"skipped"}
    assert answers(targets) == {h: [AFTER] * len(ts) for h, ts in targets.items()}


def test_rollout_check_mode_touches_no_process(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    rc, report, out = rollout(fleet, builds, "--check", patchbox_serial=[1, "100%"])
    assert rc == 0, out
    assert report["check_mode"] is True and report["rollout"] == "finished"
    for h in targets:
        r = report["hosts"][h]
        assert r["status"] == "checked" and r["changed"] is True
        assert {p["result"] for p in r["processes"]} == {"applied"}
        assert all(p["reason"].startswith("check mode") for p in r["processes"])
        assert all(p["patches"] == [] for p in report["patch_levels"][h])
    assert answers(targets) == {h: [BEFORE] * len(ts) for h, ts in targets.items()}


def test_failed_health_check_rolls_back_and_stops(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    h1, h2, h3 = fleet.fleet.hosts
    (h2.scratch / "unhealthy").touch()
    rc, report, out = rollout(fleet, builds, patchbox_serial=[1], patchbox_max_fail_percentage=0)
    assert rc == 2, out  # failed hosts
    got = answers(targets)
    assert got["h1"] == [AFTER, AFTER]  # the canary passed and keeps the patch
    assert got["h2"] == [BEFORE, BEFORE]  # patched, check failed, removed again
    assert got["h3"] == [BEFORE, BEFORE]  # never reached
    assert not (h3.staging / "helper.pbx").exists()  # not even the file was copied there
    assert report["rollout"] == "stopped" and report["last_batch"] == ["h2"]
    hosts = report["hosts"]
    assert hosts["h1"]["status"] == "patched"
    assert hosts["h2"]["status"] == "rolled back"
    assert hosts["h2"]["step"] == "Run the health check command"
    assert {p["result"] for p in hosts["h2"]["processes"]} == {"applied"}
    assert sorted((p["pid"], p["result"]) for p in hosts["h2"]["rollback"]) == sorted(
        (t.pid, "removed") for t in targets["h2"]
    )
    assert hosts["h3"]["status"] == "not reached"
    assert all(p["patches"] == [] for p in report["patch_levels"]["h2"])
    table = (fleet.base / "report" / "rollout.txt").read_text()
    assert ": stopped" in table
    assert any(line.split()[:3] == ["h2", "rolled", "back"] for line in table.splitlines())
    assert any(line.split()[:3] == ["h3", "not", "reached"] for line in table.splitlines())


def test_failure_rate_within_threshold_goes_on(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    h1, h2, h3 = fleet.fleet.hosts
    (h2.scratch / "unhealthy").touch()
    # Batches [h1, h2] then [h3]: one failure in two is 50 %, not more than 50 %.
    rc, report, out = rollout(
        fleet, builds, patchbox_serial=[2, 1], patchbox_max_fail_percentage=50
    )
    assert rc == 2, out  # h2 failed, but the rollout went on
    got = answers(targets)
    assert got == {"h1": [AFTER] * 2, "h2": [BEFORE] * 2, "h3": [AFTER] * 2}
    assert report["rollout"] == "finished"
    assert [report["hosts"][h]["status"] for h in ("h1", "h2", "h3")] == [
        "patched",
        "rolled back",
        "patched",
    ]


def test_installed_rollout_rolls_back_the_store_too(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    h1, h2, h3 = fleet.fleet.hosts
    (h1.scratch / "unhealthy").touch()  # the canary fails: nothing else is touched
    rc, report, out = rollout(fleet, builds, patchbox_state="installed", patchbox_serial=[1])
    assert rc == 2, out
    assert report["rollout"] == "stopped" and report["hosts"]["h1"]["status"] == "rolled back"
    assert answers(targets) == {h: [BEFORE] * len(ts) for h, ts in targets.items()}
    bid = builds["build_id"]
    assert list((h1.store / bid).glob("*.pbx")) == []  # installed, then uninstalled
    assert not (h2.store / bid).exists() and not (h3.store / bid).exists()
    assert [report["hosts"][h]["status"] for h in ("h2", "h3")] == ["not reached"] * 2


# -- the staging directory under attack (docs/security.md) ---------------------------------

# What nobody does on h1 before the rollout, in h1's own mount namespace (/var/tmp there is
# h1's scratch directory: world-writable and sticky), and where the rollout is told to
# stage the patch.
ATTACKS = {
    # nobody makes the staging directory first, open to all: it would swap the patch.
    "a directory": (
        "os.mkdir('/var/tmp/pbx-stage'); os.chmod('/var/tmp/pbx-stage', 0o777)",
        "/var/tmp/pbx-stage",
    ),
    # a link to root's store: followed, root would chmod it 0700 and copy the patch in.
    "a link": ("os.symlink('/var/lib/patchbox', '/var/tmp/pbx-stage')", "/var/tmp/pbx-stage"),
    # nobody owns the directory above: it could rename root's staging directory away.
    "a parent": ("os.mkdir('/var/tmp/nobody', 0o755)", "/var/tmp/nobody/stage"),
}
REFUSALS = {
    "a directory": (
        "Refuse a staging directory that someone else made",
        "/var/tmp/pbx-stage exists and is owned by uid 65534 (nobody), not root, mode 0777",
    ),
    "a link": (
        "Refuse a staging directory that someone else made",
        "/var/tmp/pbx-stage exists and is a symbolic link (to /var/lib/patchbox)",
    ),
    "a parent": (
        "Refuse directories above it that someone else could change",
        "/var/tmp/nobody is owned by uid 65534, not root (mode 0755)",
    ),
}


def as_nobody_on(host: Host, code: str) -> None:
    """Runs Python ``code`` (with os imported) as nobody in ``host``'s namespaces."""
    proc = subprocess.run(
        ["nsenter", "-t", str(host.init_pid), "-m", "-p", "--", *AS_NOBODY]
        + [sys.executable, "-c", f"import os; {code}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_staging_directory_nobody_prepared_fails_the_host(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]], attack: str
) -> None:
    """nobody prepares the place where the rollout will stage the patch on h1: the role
    fails h1 before anything is copied or applied, says why, and the rollout stops
    there. (The default, /var/lib/patchbox-staging, is root's: see the first test.)"""
    h1 = fleet.fleet.host("h1")
    code, staging = ATTACKS[attack]
    as_nobody_on(h1, code)
    rc, report, out = rollout(fleet, builds, patchbox_serial=[1], patchbox_staging_dir=staging)
    assert rc == 2, out
    r = report["hosts"]["h1"]
    step, reason = REFUSALS[attack]
    assert (r["status"], r["step"]) == ("failed", step), r
    assert reason in " ".join(r["reason"].split()), r["reason"]
    assert r["processes"] == [] and r["changed"] is False
    assert report["rollout"] == "stopped"
    assert [report["hosts"][h]["status"] for h in ("h2", "h3")] == ["not reached"] * 2
    assert answers(targets) == {h: [BEFORE] * len(ts) for h, ts in targets.items()}
    # Nothing was made, copied or changed where nobody pointed.
    scratch = h1.scratch
    assert not list(scratch.rglob("helper.pbx"))
    assert not (scratch / "nobody" / "stage").exists()
    assert (h1.store.stat().st_mode & 0o7777, list(h1.store.iterdir())) == (0o755, [])


# -- rollback undoes exactly what this run did (issue 19) ----------------------------------


def pre_patch(fleet: Controller, builds: Build, host: str, pids: list[int], state: str) -> None:
    """Gives processes ``pids`` of ``host`` the patch before the rollout (and, for
    ``installed``, the host's store its entry), with the module."""
    shutil.copy(builds["patch"], fleet.fleet.host(host).scratch / "helper.pbx")
    args = {"src": "/var/tmp/helper.pbx", "state": state, "pids": pids}
    r = fleet.adhoc(host, "patchbox.live.patch", args)
    assert r.rc == 0, r.output


def test_rollback_leaves_what_was_there_before(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """Before the rollout h1's store holds the patch and h1's first process has it. The
    rollout (state installed) applies it to the second one, h1's health check fails,
    and the rollback takes it out of that process only: the first keeps it, and the
    store keeps the entry this run did not make."""
    h1 = fleet.fleet.host("h1")
    first, second = targets["h1"]
    pre_patch(fleet, builds, "h1", [first.pid], "installed")
    (entry,) = (h1.store / builds["build_id"]).glob("*-helper.pbx")
    inode = entry.stat().st_ino
    (h1.scratch / "unhealthy").touch()
    rc, report, out = rollout(fleet, builds, patchbox_state="installed", patchbox_serial=[1])
    assert rc == 2, out
    r = report["hosts"]["h1"]
    assert r["status"] == "rolled back", r
    rows = {p["pid"]: p["result"] for p in r["processes"]}
    assert rows == {first.pid: "skipped", second.pid: "applied"}
    assert [(p["pid"], p["result"]) for p in r["rollback"]] == [(second.pid, "removed")]
    assert r["undone"] == {"pids": [second.pid], "store_entry": False}
    assert (first.call("use_helper", 4), second.call("use_helper", 4)) == (AFTER, BEFORE)
    assert entry.is_file() and entry.stat().st_ino == inode  # never uninstalled
    assert [report["hosts"][h]["status"] for h in ("h2", "h3")] == ["not reached"] * 2


def test_partial_apply_is_undone_in_the_processes_it_reached(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """One process of h1 refuses the patch (its bytes differ): the apply fails after
    patching the other one, and the rollback removes it from that one alone."""
    good, bad = targets["h1"]
    corrupt_padding(bad, fleet.fleet.host("h1").app_dir / "target")
    rc, report, out = rollout(fleet, builds, patchbox_serial=[1])
    assert rc == 2, out
    r = report["hosts"]["h1"]
    assert (r["status"], r["step"]) == (
        "rolled back",
        "Apply the patch to every running process of its build",
    ), r
    assert "EXPECTED_MISMATCH" in r["reason"]
    assert r["undone"] == {"pids": [good.pid], "store_entry": False}
    assert [(p["pid"], p["result"]) for p in r["rollback"]] == [(good.pid, "removed")]
    assert (good.call("use_helper", 4), bad.call("use_helper", 4)) == (BEFORE, BEFORE)


def test_apply_refused_before_touching_anything_undoes_nothing(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """h1's first process has the patch before the rollout; the rollout's apply is
    refused before any process is touched (a trust directory with no key, the patch
    unsigned). Nothing is removed: h1 is "failed", not "rolled back", and keeps what it
    had."""
    h1 = fleet.fleet.host("h1")
    first, second = targets["h1"]
    pre_patch(fleet, builds, "h1", [first.pid], "present")
    (h1.scratch / "keys").mkdir()
    rc, report, out = rollout(
        fleet, builds, patchbox_serial=[1], patchbox_trust_dir="/var/tmp/keys"
    )
    assert rc == 2, out
    r = report["hosts"]["h1"]
    assert (r["status"], r["step"]) == (
        "failed",
        "Apply the patch to every running process of its build",
    ), r
    assert "signed" in r["reason"] and r["rollback"] == [] and r["processes"] == []
    assert r["undone"] == {"pids": [], "store_entry": False}
    assert (first.call("use_helper", 4), second.call("use_helper", 4)) == (AFTER, BEFORE)


def test_unreachable_host_counts_as_failed(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """h2 cannot be reached (nothing listens where the inventory says). In the batch
    [h1, h2] it is a failed host: with max_fail_percentage 0 the rollout stops there
    and h3 is never touched; h2 is reported "not reached" with the reason. With 50 %
    (one failure in two is not more than half) the rollout goes on to h3."""
    inventory = fleet.base / "inventory-h2-down.ini"
    inventory.write_text(
        fleet.inventory.read_text().replace(
            "h2 ansible_host=10.77.0.12", "h2 ansible_host=10.77.0.12 ansible_port=2"
        )
    )
    assert "ansible_port=2" in inventory.read_text()
    rc, report, out = rollout(
        fleet,
        builds,
        "-i",
        str(inventory),
        patchbox_serial=[2, 1],
        patchbox_max_fail_percentage=0,
    )
    assert rc == 2, out
    hosts = report["hosts"]
    assert hosts["h1"]["status"] == "patched"
    assert (hosts["h2"]["status"], hosts["h2"]["step"]) == (
        "not reached",
        "Stop: the host is unreachable",
    ), hosts["h2"]
    assert "unreachable" in hosts["h2"]["reason"]
    assert hosts["h3"]["status"] == "not reached" and hosts["h3"]["step"] == ""
    assert report["rollout"] == "stopped" and report["last_batch"] == ["h1", "h2"]
    assert report["summary"] == {"not reached": 2, "patched": 1}
    got = answers(targets)
    assert got == {"h1": [AFTER] * 2, "h2": [BEFORE] * 2, "h3": [BEFORE] * 2}
    table = (fleet.base / "report" / "rollout.txt").read_text()
    assert any(
        line.split()[:3] == ["h2", "not", "reached"] and "unreachable" in line
        for line in table.splitlines()
    ), table

    rc, report, out = rollout(
        fleet,
        builds,
        "-i",
        str(inventory),
        patchbox_serial=[2, 1],
        patchbox_max_fail_percentage=50,
    )
    assert rc == 2, out
    assert report["rollout"] == "finished"
    statuses = [report["hosts"][h]["status"] for h in ("h1", "h2", "h3")]
    assert statuses == ["patched", "not reached", "patched"]
    assert answers(targets) == {"h1": [AFTER] * 2, "h2": [BEFORE] * 2, "h3": [AFTER] * 2}


def test_host_where_nothing_was_patched_is_not_patched(
    fleet: Controller, builds: Build, targets: dict[str, list[HostTarget]]
) -> None:
    """With the defaults (no health command) the role still checks each process the
    patch is for: on h2, where no process of the build runs, nothing was patched, and
    h2 fails that check instead of being reported "patched"."""
    for t in targets["h2"]:
        t.stop()
    try:
        rc, report, out = rollout(
            fleet,
            builds,
            patchbox_serial=[1, 2],
            patchbox_max_fail_percentage=50,
            patchbox_health_command="",
        )
    finally:
        for t in targets["h2"]:
            t.start()
    assert rc == 2, out
    r = report["hosts"]["h2"]
    assert (r["status"], r["step"]) == (
        "failed",
        "Check that every patched process runs and lists the patch",
    ), r
    assert "nothing was patched" in r["reason"] and r["rollback"] == []
    assert [report["hosts"][h]["status"] for h in ("h1", "h3")] == ["patched", "patched"]
    assert report["hosts"]["h1"]["health"]["processes"] == [t.pid for t in targets["h1"]]


def test_library_rollout_is_rolled_back_in_every_process_mapping_it(
    fleet: Controller, library: LibraryBuild, targets: dict[str, list[HostTarget]]
) -> None:
    """A library's patch on h1: both programs that map the library get it, h1's health
    check fails, and the rollback removes it from both (the targets of another program
    were skipped and are left alone)."""
    h1 = fleet.fleet.host("h1")
    users = [HostTarget(h1, exe).start() for exe in library["users"]]
    try:
        (h1.scratch / "unhealthy").touch()
        rc, report, out = rollout(fleet, library, patchbox_serial=[1])
        assert rc == 2, out
        r = report["hosts"]["h1"]
        assert r["status"] == "rolled back", r
        rows = {p["pid"]: p["result"] for p in r["processes"]}
        assert {rows[u.pid] for u in users} == {"applied"}
        assert {rows[t.pid] for t in targets["h1"]} == {"skipped"}
        assert sorted((p["pid"], p["result"]) for p in r["rollback"]) == sorted(
            (u.pid, "removed") for u in users
        )
        assert [u.call("lib_answer", 4) for u in users] == ["41", "41"]
    finally:
        for u in users:
            u.stop()
