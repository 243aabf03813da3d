"""QEMU's VM names (tier 2: `-m process`; docs/host.md, "VM names"): `patchbox ps` shows
the name each QEMU was started with (`-name guest=NAME,...`, libvirt's form) and `--vm
NAME` selects processes by it for `ps`, `apply --all` and `remove --all`.

The processes are the end-to-end target program with the agent linked, not QEMU: it
ignores its arguments, and a copy named `qemu-system-x86_64` is QEMU as far as the name
goes. Behaviour is observed from outside (use_helper's answer on stdout). Every build
has a random build-id, so no process of another test run is reached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live import Target

from helpers import BIN, compile_c, render, run_tool, unique_build_id

pytestmark = pytest.mark.process

BEFORE, AFTER = "41", "42"  # use_helper(4) unpatched, patched


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    """Returns the program as ``qemu`` (named qemu-system-x86_64), the same file named
    ``target`` (same build-id: not QEMU by its name) and the patch of use_helper."""
    base = tmp_path_factory.mktemp("vm")
    for d in ("qemu", "other", "fixed"):
        (base / d).mkdir()
    # Compiled as target.c (the patch's object must name the same source file).
    other = compile_c(render(), base / "other" / "target", agent=True, extra=[unique_build_id()])
    qemu = base / "qemu" / "qemu-system-x86_64"
    shutil.copy2(other, qemu)
    obj = compile_c(render(USE_HELPER="scale(x) + 2"), base / "fixed" / "target.o", obj=True)
    pbx = base / "helper.pbx"
    run_tool("extract-patch", "--function", "use_helper", "--name", "helper", "-o", pbx, obj, qemu)
    return {"qemu": qemu, "other": other, "patch": pbx}


@pytest.fixture()
def vms(build: dict[str, Path]) -> Iterator[dict[str, Target]]:
    """Yields {label: running target}: QEMUs named vm1 and "vm,2" (its comma doubled on
    the command line), one started with -name but not QEMU by its name, and a QEMU
    without -name."""
    args = {
        "vm1": (build["qemu"], ["-machine", "none", "-name", "guest=vm1,debug-threads=on"]),
        "vm2": (build["qemu"], ["-name", "guest=vm,,2,debug-threads=on", "-nodefaults"]),
        "other": (build["other"], ["-name", "guest=vm1,debug-threads=on"]),
        "unnamed": (build["qemu"], ["-nodefaults"]),
    }
    started: dict[str, Target] = {}
    try:
        for label, (exe, extra) in args.items():
            started[label] = Target(exe, argv=[str(exe), *extra])
        yield started
    finally:
        dead = [label for label, t in started.items() if not t.alive()]
        for t in started.values():
            t.stop()
        assert not dead, f"died during the test: {dead}"


def patchbox(*args: object, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == expect, f"{args}: rc {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc


def rows_of(vms: dict[str, Target], *args: object) -> dict[str, dict[str, Any]]:
    """Returns {label: its row} of `patchbox ARGS --json` for the test's processes listed."""
    label = {t.pid: name for name, t in vms.items()}
    rows = json.loads(patchbox(*args, "--json").stdout)
    return {label[r["pid"]]: r for r in rows if r["pid"] in label}


def answers(vms: dict[str, Target]) -> dict[str, str]:
    return {name: t.call("use_helper", 4) for name, t in vms.items()}


def test_ps_shows_vm_names_and_selects_by_them(vms: dict[str, Target]) -> None:
    rows = rows_of(vms, "ps")
    assert {k: r["vm"] for k, r in rows.items()} == {
        "vm1": "vm1",
        "vm2": "vm,2",
        "other": "",
        "unnamed": "",
    }
    assert set(rows_of(vms, "ps", "--vm", "vm1")) == {"vm1"}
    assert set(rows_of(vms, "ps", "--vm", "vm,2", "--vm", "vm1")) == {"vm1", "vm2"}
    assert rows_of(vms, "ps", "--vm", "vm") == {}
    table = patchbox("ps").stdout.splitlines()
    header = table[0].split()
    assert header[:2] == ["PID", "VM"]
    line = {int(line.split()[0]): line.split() for line in table[1:]}
    assert line[vms["vm1"].pid][1] == "vm1" and line[vms["vm2"].pid][1] == "vm,2"
    assert line[vms["other"].pid][1] == "-" and line[vms["unnamed"].pid][1] == "-"


def test_apply_and_remove_all_by_vm_name(vms: dict[str, Target], build: dict[str, Path]) -> None:
    rows = rows_of(vms, "apply", "--all", "--vm", "vm1", build["patch"])
    # Only the QEMU named vm1: "other" says -name guest=vm1 but is not QEMU.
    assert {k: (r["result"], r["vm"]) for k, r in rows.items()} == {"vm1": ("applied", "vm1")}
    assert answers(vms) == {"vm1": AFTER, "vm2": BEFORE, "other": BEFORE, "unnamed": BEFORE}
    text = patchbox("apply", "--all", "--vm", "vm,2", "--vm", "vm1", build["patch"]).stdout
    assert f"pid {vms['vm2'].pid:<8} applied  {build['qemu']} (vm vm,2)" in text
    assert f"pid {vms['vm1'].pid:<8} skipped  {build['qemu']} (vm vm1): " in text
    assert answers(vms) == {"vm1": AFTER, "vm2": AFTER, "other": BEFORE, "unnamed": BEFORE}
    assert rows_of(vms, "ps", "--vm", "vm,2")["vm2"]["patches"] == ["helper"]

    rows = rows_of(vms, "remove", "--all", "--vm", "vm1", "helper")
    assert {k: r["result"] for k, r in rows.items()} == {"vm1": "removed"}
    assert answers(vms) == {"vm1": BEFORE, "vm2": AFTER, "other": BEFORE, "unnamed": BEFORE}
    # A name no process has: nothing is touched (no process is not a failure).
    assert rows_of(vms, "remove", "--all", "--vm", "vm3", "helper") == {}
    assert rows_of(vms, "apply", "--all", "--vm", "vm3", build["patch"]) == {}
    rows = rows_of(vms, "remove", "--all", "--exe", build["qemu"], "helper")
    assert rows["vm2"]["result"] == "removed" and rows["vm1"]["result"] == "skipped"
    assert set(answers(vms).values()) == {BEFORE}
