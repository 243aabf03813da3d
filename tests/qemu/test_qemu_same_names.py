"""`patchbox build --qemu` of a one-function fix in ``net/vhost-vdpa.c`` on QEMU built with
its default devices (tier 3: `pytest -m qemu`; issue 21).

QEMU has two ``vhost-vdpa.c``, ``net/`` and ``hw/virtio/``, each with a static
``vhost_vdpa_cleanup`` (and ``vhost_vdpa_get_features``, ``vhost_vdpa_get_iova_range``);
``.symtab`` names both files ``vhost-vdpa.c``. Such a build used to stop before comparing
anything: ``symbol 'vhost_vdpa_cleanup' in vhost-vdpa.c is ambiguous``. The fix clears two
pointers after freeing them in net's ``vhost_vdpa_cleanup``; the patch must replace that
function and no other, at the address whose DWARF line table says ``net/vhost-vdpa.c``
(read with binutils' ``addr2line``, not with patchbox), and apply to and be removed from a
running QEMU. The function only runs when a vhost-vdpa netdev goes away, which needs a
vDPA device: the test applies and removes, it does not call it.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
from qemuutil import BIN, Qemu, run

from patchbox.format.layout import load_patch
from patchbox.wire import ApplyFlag

pytestmark = pytest.mark.qemu

SOURCE = "net/vhost-vdpa.c"
OLD = "    qemu_vfree(s->cvq_cmd_out_buffer);\n    qemu_vfree(s->status);\n"
NEW = (
    "    qemu_vfree(s->cvq_cmd_out_buffer);\n"
    "    s->cvq_cmd_out_buffer = NULL;\n"
    "    qemu_vfree(s->status);\n"
    "    s->status = NULL;\n"
)


def static_addresses(exe: Path, name: str) -> dict[str, int]:
    """Returns {source path as its DWARF line table names it: address} of every local
    function ``name`` of ``exe`` (readelf for the symbols, addr2line for the files)."""
    addrs = [
        int(cols[1], 16)
        for cols in (ln.split() for ln in run("readelf", "-sW", exe).stdout.splitlines())
        if cols[-1:] == [name] and cols[3:5] == ["FUNC", "LOCAL"]
    ]
    lines = run("addr2line", "-e", exe, *(hex(a) for a in addrs)).stdout.split()
    return {line.rsplit(":", 1)[0]: a for line, a in zip(lines, addrs, strict=True)}


def test_fix_in_net_vhost_vdpa_builds_and_applies(
    qemu: Qemu, qemu_exe: Path, tmp_path: Path
) -> None:
    src = qemu_exe.parent.parent / "src"
    text = (src / SOURCE).read_text()
    assert text.count(OLD) == 1, f"{OLD!r} not once in {SOURCE}"
    diff = tmp_path / "vdpa.patch"
    diff.write_text(
        "".join(
            difflib.unified_diff(
                text.splitlines(True),
                text.replace(OLD, NEW).splitlines(True),
                f"a/{SOURCE}",
                f"b/{SOURCE}",
            )
        )
    )
    cleanups = static_addresses(qemu_exe, "vhost_vdpa_cleanup")
    net = [a for f, a in cleanups.items() if f.endswith("/net/vhost-vdpa.c")]
    hw = [a for f, a in cleanups.items() if f.endswith("/hw/virtio/vhost-vdpa.c")]
    assert len(cleanups) == 2 and len(net) == 1 and len(hw) == 1, cleanups

    pbx = tmp_path / "vdpa.pbx"
    args = ["--source", src, "--diff", diff, "--binary", qemu_exe, "--name", "vdpa", "-o", pbx]
    proc = run(BIN / "patchbox", "build", "--qemu", "--explain", *args, timeout=600)
    out = proc.stdout
    print(out, proc.stderr, sep="\n")
    assert "ambiguous" not in out + proc.stderr
    assert "1 object(s) of" in out  # net/vhost-vdpa.c's, not hw/virtio's
    assert "libcommon.fa.p/net_vhost-vdpa.c.o (vhost-vdpa.c):" in out
    assert "hw_virtio_vhost-vdpa.c.o" not in out
    ins = [ln.split() for ln in out.splitlines() if ln.startswith("  in ")]
    assert [ln[:3] for ln in ins] == [["in", "function", "vhost_vdpa_cleanup"]], out

    patch = load_patch(pbx)
    assert [f.symbol for f in patch.functions] == ["vhost_vdpa_cleanup"]
    assert [f.target for f in patch.functions] == net, (hex(patch.functions[0].target), cleanups)
    assert patch.flags & ApplyFlag.RETAIN

    run(BIN / "patchbox", "apply", "-p", qemu.pid, pbx)
    listing = json.loads(run(BIN / "patchbox", "list", "-p", qemu.pid, "--json").stdout)
    assert [p["name"] for p in listing] == ["vdpa"]
    assert qemu.ctl.execute("query-version")["qemu"]["major"] == 7
    run(BIN / "patchbox", "remove", "-p", qemu.pid, "vdpa")
    assert json.loads(run(BIN / "patchbox", "list", "-p", qemu.pid, "--json").stdout) == []
