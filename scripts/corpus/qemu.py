"""The QEMU 7.2 part of the corpus.

Debian applies upstream's stable releases as ``debian/patches/v7.2.N.diff``; its changelog
names the CVE fixes each release carries. A fix is *carved* out of its release diff: the
sections of the files that hold it (``Fix.files``; ``Fix.hunks`` picks hunks when a section
mixes commits). The level before the fixes is the project's cached QEMU source
(scripts/qemu/build-qemu.sh: Debian's 7.2.22 with every fix in) with every carved fix
reverted, built by the same script into the corpus cache (``CACHE/qemu-cache``; the first build
takes minutes, later runs rebuild only the files whose reverted set changed). Each fix is
then built with ``patchbox build --qemu`` against that build, applied to one running QEMU
under QMP load, probed and removed, one after the other.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from patchbox.sourcediff import file_texts, parse_diff, strip_path

from . import qemu_pci, qemu_scsi, qemu_virtio
from .fixes import Fix, Package, key
from .harness import (
    CACHE,
    HERE,
    ROOT,
    RUN_DIR,
    Ctx,
    Daemon,
    Probe,
    apply_remove,
    build_patch,
    env_with_tools,
    log,
    run,
    sha,
    wait_agent,
)
from .load.qmp_client import QMP
from .load.vnc_client import NOTIFY, PROVIDE, REQUEST, TEXT, Vnc
from .report import verdict

__all__ = ["PROBES", "QTEST", "alive", "carve", "run_fixes", "start_qemu"]

QEMU_CACHE = Path("/var/cache/patchbox/qemu")  # the project's (scripts/qemu/build-qemu.sh)
LEVEL = CACHE / "qemu-cache"
VNC = RUN_DIR / "qemu-vnc.sock"  # the level QEMU's VNC server (the clipboard probes)
QTEST = RUN_DIR / "qemu-qtest.sock"  # a device probe's QEMU (Probe.machine)


def carve(fix: Fix, patches: Path) -> str:
    """Returns the fix's diff: its files' parts of the release diff (only the hunks
    ``fix.hunks`` names, 1-based, for files listed there), read with
    :func:`patchbox.sourcediff.file_texts`."""
    text = (patches / fix.patch).read_text(errors="surrogateescape")
    parts = {strip_path(t.change.name, 1): t for t in file_texts(text)}
    out = []
    for f in fix.files:
        if f not in parts:
            raise RuntimeError(f"{fix.patch} has no section for {f}")
        out.append(parts[f].select(fix.hunks[f]) if f in fix.hunks else parts[f].text)
    return "".join(out)


def _release(patch: str) -> int:
    """Returns N of release diff ``v7.2.N.diff``."""
    return int(patch.removeprefix("v7.2.").removesuffix(".diff"))


def later_sections(fix: Fix, patches: Path) -> list[tuple[str, str]]:
    """Returns [(release diff, its sections of the fix's files)] of every release after the
    fix's that touches one of its files, newest first: what a *rewind* reverts before the
    fix's own hunks when later releases changed the same lines."""
    out = []
    later = sorted(
        (p for p in patches.glob("v7.2.*.diff") if _release(p.name) > _release(fix.patch)),
        key=lambda p: _release(p.name),
        reverse=True,
    )
    for p in later:
        parts = {
            strip_path(t.change.name, 1): t.text
            for t in file_texts(p.read_text(errors="surrogateescape"))
        }
        text = "".join(parts[f] for f in fix.files if f in parts)
        if text:
            out.append((p.name, text))
    return out


def _revert(diff: Path, src: Path) -> str | None:
    """Reverts ``diff`` in ``src``; returns None, or patch's complaint (nothing changed)."""
    dry = run(f"patch -R -p1 -s -f --dry-run < {diff}", cwd=src, check=False)
    if dry.returncode != 0:
        return dry.stdout[-300:]
    run(f"patch -R -p1 -s -f < {diff}", cwd=src)
    return None


def _revert_rewinding(fix: Fix, diff: Path, src: Path, patches: Path) -> list[str]:
    """Reverts the fix's ``diff`` in ``src``: if its hunks no longer revert on 7.2.22, the
    later releases' sections of its files are reverted first, newest first, until they do
    (the files as of the release before the fix). Returns the release diffs rewound;
    raises RuntimeError when even the oldest state does not take the revert, leaving
    ``src`` as it was (the work is done on a copy of the fix's files)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for f in fix.files:
            if (src / f).exists():
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, tmp / f)
        why = _revert(diff, tmp)
        rewound: list[str] = []
        if why is not None:
            for name, text in later_sections(fix, patches):
                part = tmp / f"rewind-{name}"
                part.write_text(text)
                step = _revert(part, tmp)
                if step is not None:
                    raise RuntimeError(f"{name}'s sections of {', '.join(fix.files)}: {step}")
                rewound.append(name)
                why = _revert(diff, tmp)
                if why is None:
                    break
            else:
                raise RuntimeError(f"its hunks do not revert on 7.2.22: {why}")
        for f in fix.files:
            if (tmp / f).exists():
                shutil.copyfile(tmp / f, src / f)  # a new mtime: ninja rebuilds its users
            else:
                (src / f).unlink(missing_ok=True)
        return rewound


def level(fixes: list[Fix]) -> tuple[Path, Path, dict[str, str], dict[str, list[str]]]:
    """Returns (source, binary, {fix key: why it is not in the level}, {fix key: release
    diffs rewound before its revert}) of the QEMU level with every carved fix of ``fixes``
    reverted."""
    if not (QEMU_CACHE / "src/VERSION").exists():
        # The cached 7.2.22 source, fetched by the project's build. Only its source is
        # read here: once it is there, the project's build is left alone (relinking it
        # with this checkout's agent would replace the binary other users run).
        run([str(ROOT / "scripts/qemu/build-qemu.sh")], timeout=3600)
    diffs = LEVEL / "diffs"
    diffs.mkdir(parents=True, exist_ok=True)
    patches = QEMU_CACHE / "src/debian/patches"
    carved: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for fix in fixes:
        if not fix.files:
            skipped[key(fix)] = fix.note or "not carved"
            continue
        p = diffs / f"{key(fix)}.diff"
        p.write_text(carve(fix, patches))
        carved[key(fix)] = p
    src = LEVEL / "src"
    if not (src / "VERSION").exists():
        log(f"qemu: copying {QEMU_CACHE / 'src'} to {src}")
        shutil.rmtree(src.with_name("src.tmp"), ignore_errors=True)
        run(["cp", "-a", str(QEMU_CACHE / "src"), str(src.with_name("src.tmp"))])
        src.with_name("src.tmp").rename(src)
        (LEVEL / "dl").mkdir(exist_ok=True)
        for dsc in (QEMU_CACHE / "dl").glob("qemu_7.2*.dsc"):
            shutil.copy2(dsc, LEVEL / "dl")
    # Which fixes are reverted now: restore the files of the old set, revert the new one.
    state = LEVEL / "reverted.json"
    old: dict[str, Any] = json.loads(state.read_text()) if state.exists() else {}
    rewound: dict[str, list[str]] = {}
    new = {
        k: sorted({strip_path(c.new, 1) for c in parse_diff(p.read_text()) if c.new})
        for k, p in carved.items()
    }
    want = {k: sha(carved[k].read_text()) for k in carved}
    if old.get("_stamp") != [json.dumps(want, sort_keys=True)]:
        files = {f for k, fs in old.items() if not k.startswith("_") for f in fs} | {
            f for fs in new.values() for f in fs
        }
        for f in sorted(files):
            orig = QEMU_CACHE / "src" / f
            if orig.exists():
                shutil.copyfile(orig, src / f)  # a new mtime: ninja rebuilds its users
        by_key = {key(f): f for f in fixes}
        for k, p in carved.items():
            try:
                rewound[k] = _revert_rewinding(by_key[k], p, src, patches)
            except RuntimeError as err:
                skipped[k] = str(err)
                new.pop(k)
        stamp = {"_stamp": [json.dumps(want, sort_keys=True)]}
        done = {"_rewound": rewound, "_skipped": {k: skipped[k] for k in carved if k in skipped}}
        state.write_text(json.dumps({**new, **stamp, **done}))
    else:
        rewound = old.get("_rewound", {})
        skipped.update(old.get("_skipped", {}))
    log(f"qemu: building the level (scripts/qemu/build-qemu.sh in {LEVEL})")
    proc = run(
        [str(ROOT / "scripts/qemu/build-qemu.sh")],
        env=env_with_tools({"PATCHBOX_QEMU_CACHE": str(LEVEL)}),
        timeout=3600,
    )
    binary = Path(proc.stdout.strip().splitlines()[-1])
    return src, binary, skipped, rewound


def qcow2_with_data_file(path: Path, data_file: str, size: int = 1 << 20) -> None:
    """Writes a qcow2 v3 image whose header names an external data file ``data_file``
    (incompatible feature bit 2, header extension 0x44415441), no cluster allocated."""
    cs = 1 << 16
    name = data_file.encode()
    ext = struct.pack(">II", 0x44415441, len(name)) + name + b"\0" * (-len(name) % 8)
    ext += struct.pack(">II", 0, 0)  # end of the header extensions
    refcount_table, refcount_block, l1 = cs, 2 * cs, 3 * cs
    hdr = b"QFI\xfb" + struct.pack(
        ">IQIIQIIQQIIQ", 3, 0, 0, 16, size, 0, 1, l1, refcount_table, 1, 0, 0
    )
    hdr += struct.pack(">QQQII", 4, 0, 0, 4, 112) + bytes(8)  # data file; zlib; header 112
    img = bytearray(4 * cs)
    img[: len(hdr) + len(ext)] = hdr + ext
    img[refcount_table : refcount_table + 8] = struct.pack(">Q", refcount_block)
    for i in range(4):  # the four clusters in use
        img[refcount_block + 2 * i : refcount_block + 2 * i + 2] = struct.pack(">H", 1)
    path.write_bytes(bytes(img))


_nodes = itertools.count(1)


def _qcow2_json_data_file(ctx: Ctx) -> str:
    """CVE-2024-4467: opens (QMP blockdev-add, read-only) a qcow2 image whose header names
    its data file as ``json:{"driver":"file","filename":SECRET}``. Unfixed QEMU parses the
    json: and opens any file the image names; fixed QEMU takes it as a plain file name."""
    d = LEVEL / "probe-4467"
    d.mkdir(exist_ok=True)
    secret = d / "secret.raw"
    secret.write_bytes(b"SECRET".ljust(1 << 20, b"\0"))
    img = d / "evil.qcow2"
    qcow2_with_data_file(img, "json:" + json.dumps({"driver": "file", "filename": str(secret)}))
    node = f"probe{next(_nodes)}"
    q = QMP(ctx.extra["qmp"])
    try:
        r = q.cmd(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": node, "read-only": True},
            file={"driver": "file", "filename": str(img), "read-only": True},
        )
        if "error" in r:
            return f"refused: {r['error']['desc']}"[:200]
        files = [n["file"] for n in q.cmd("query-named-block-nodes")["return"]]
        q.cmd("blockdev-del", **{"node-name": node})
        return "opened the data file " + ("(the secret)" if str(secret) in files else "?")
    finally:
        q.close()


_texts = itertools.count(1)


def _vnc_clipboard_trailing(ctx: Ctx) -> str:
    """CVE-2023-3255: client A owns the clipboard (extended clipboard: NOTIFY) and provides
    its text as a zlib stream followed by bytes after the stream's end; client B asks for
    the text. Unfixed QEMU loops for ever in inflate_buffer (its main loop stops: not run
    on the unfixed process); fixed QEMU takes the text and B reads it back."""
    path = ctx.extra["vnc"]
    text = b"patchbox CVE-2023-3255 #%d" % next(_texts)
    b = Vnc(path, clipboard=True)
    a = Vnc(path, clipboard=True)
    try:
        a.send_extended(NOTIFY | TEXT)
        b.read_clipboard()  # B is told A's clipboard has text
        a.send_extended(PROVIDE | TEXT, Vnc.text_payload(text) + b"after the end")
        b.send_extended(REQUEST | TEXT)
        flags, payload = b.read_clipboard()
        if not flags & PROVIDE:
            return f"B got flags {flags:#x}, no text"
        return f"B read back {Vnc.text_of(payload).decode()!r}"
    except (TimeoutError, OSError, EOFError) as err:
        return f"no answer: {err!r}"
    finally:
        a.close()
        b.close()


def _vnc_clipboard_empty(ctx: Ctx) -> str:
    """CVE-2023-6683: client A (no extended clipboard: its clipboard peer has no request
    function) sends an empty ClientCutText; client B (extended clipboard) is notified.
    Unfixed QEMU marks the text available with no data behind it, and B's REQUEST would
    make QEMU call A's NULL request function (not sent: it kills QEMU); fixed QEMU does not
    offer it, and B's REQUEST is ignored."""
    path = ctx.extra["vnc"]
    b = Vnc(path, clipboard=True)
    a = Vnc(path, clipboard=False)
    try:
        a.send_text(b"")
        flags, _ = b.read_clipboard()
        if flags & TEXT:
            return "empty text offered as available (a REQUEST would call a NULL function)"
        b.send_extended(REQUEST | TEXT)
        q = QMP(ctx.extra["qmp"])
        status = q.cmd("query-status")["return"]["status"]
        q.close()
        return f"empty text not offered; REQUEST ignored, QEMU {status}"
    finally:
        # A clipboard that holds data again, before A (its owner) goes away.
        a.send_text(b"x")
        time.sleep(0.2)
        a.close()
        b.close()


_ports = itertools.count(1)

# Run by gdb attached to QEMU (no breakpoint, no call into QEMU: it reads memory, ~4 s
# stopped): the BH of the virtio-serial port named PORT and the guards it could have.
_GDB_PORT_GUARD = """
import gdb
vser = gdb.parse_and_eval("vserdevices.devices.lh_first")
bh_type = gdb.lookup_type("struct QEMUBH").pointer()
while int(vser):
    port = vser["ports"]["tqh_first"]
    while int(port):
        dev = port["dev"]
        if int(dev["id"]) and dev["id"].string() == PORT:
            guard = int(port["bh"].cast(bh_type)["reentrancy_guard"])
            own = int(dev["mem_reentrancy_guard"].address)
            bus_parent = int(dev["parent_bus"]["parent"]["mem_reentrancy_guard"].address)
            print("GUARD", guard, own, bus_parent)
        port = port["next"]["tqe_next"]
    vser = vser["next"]["le_next"]
"""


def _virtio_serial_hotplug(ctx: Ctx) -> str:
    """CVE-2024-3446: hot-plugs a virtio-serial port (QMP device_add virtserialport on a
    virtio-serial-pci added once), which runs virtser_port_device_realize, and reads with
    gdb which reentrancy guard the port's bottom half got: unfixed, the port's own
    (``&dev->mem_reentrancy_guard``, never engaged by the device's DMA); fixed, its bus
    parent's (``virtio_bh_new_guarded``)."""
    q = QMP(ctx.extra["qmp"])
    try:
        if not ctx.extra.get("vser"):
            r = q.cmd("device_add", driver="virtio-serial-pci", id="pbxvser")
            if "error" in r:
                return f"device_add virtio-serial-pci: {r['error']['desc']}"
            ctx.extra["vser"] = True
        port = f"pbxport{next(_ports)}"
        r = q.cmd("device_add", driver="virtserialport", bus="pbxvser.0", id=port)
        if "error" in r:
            return f"device_add virtserialport: {r['error']['desc']}"
    finally:
        q.close()
    assert ctx.daemon is not None
    script = LEVEL / "probe-3446.py"
    script.write_text(f"PORT = {port!r}\n" + _GDB_PORT_GUARD)
    gdb = ["gdb", "-q", "-batch", "-nx", "-p", str(ctx.daemon.pid), "-x", str(script)]
    proc = run(gdb, check=False, timeout=120)
    hit = [ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("GUARD ")]
    if len(hit) != 1:
        return f"gdb found no port {port}: {(proc.stdout + proc.stderr)[-200:]}"
    guard, own, bus_parent = (int(x) for x in hit[0])
    if guard == bus_parent:
        return f"{port}: BH guarded by its bus parent's reentrancy guard"
    if guard == own:
        return f"{port}: BH guarded by the port's own reentrancy guard"
    return f"{port}: BH guard {guard:#x}, neither the port's nor its bus parent's"


PROBES: dict[str, Probe] = {
    "qemu_qcow2_json_data_file": Probe(
        _qcow2_json_data_file,
        lambda s: s.startswith("refused: Could not open 'json:"),
        expected="the json: data file name is not parsed",
    ),
    "qemu_vnc_clipboard_trailing": Probe(
        _vnc_clipboard_trailing,
        lambda s: s.startswith("B read back"),
        on_unfixed=False,
        expected="the text is taken; QEMU's main loop goes on",
    ),
    "qemu_vnc_clipboard_empty": Probe(
        _vnc_clipboard_empty,
        lambda s: s.startswith("empty text not offered"),
        expected="an empty clipboard text is not offered as available",
    ),
    "qemu_virtio_serial_hotplug": Probe(
        _virtio_serial_hotplug,
        lambda s: s.endswith("by its bus parent's reentrancy guard"),
        expected="a port hot-plugged after the patch gets a BH guarded by its bus parent",
    ),
    # The device probes (qtest-driven, each on its own machine: Probe.machine).
    **qemu_scsi.PROBES,
    **qemu_virtio.PROBES,
    **qemu_pci.PROBES,
}


def _disk() -> Path:
    img = LEVEL / "disk0.img"
    if not img.exists():
        with img.open("wb") as f:
            f.truncate(64 << 20)
    return img


def start_qemu(
    binary: Path, machine: tuple[str, ...] = (), where: Path = RUN_DIR
) -> tuple[Daemon, Path]:
    """Starts QEMU (TCG, QMP) and returns the daemon and its QMP socket. Without
    ``machine``: a pc machine with an IDE disk, a websocket chardev and VNC on a Unix
    socket (``VNC``); the guest has no OS, SeaBIOS waits. With ``machine`` (a device
    probe's QEMU arguments): that machine under the qtest accelerator, its socket
    ``where / QTEST.name``. Sockets and log are in ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    qmp = where / "qemu-qmp.sock"
    for sock in (qmp, VNC, where / QTEST.name):
        sock.unlink(missing_ok=True)
    if machine:
        args = ["-accel", "qtest", "-qtest", f"unix:{where / QTEST.name},server=on,wait=off"]
        args += ["-qtest-log", "/dev/null", "-display", "none", "-nodefaults", *machine]
    else:
        args = [
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-display",
            "none",
            "-nodefaults",
            "-drive",
            f"file={_disk()},if=ide,format=raw,node-name=disk0",
            "-chardev",
            "socket,id=ws0,host=127.0.0.1,port=5701,server=on,wait=off,websocket=on",
            "-vnc",
            f"unix:{VNC}",
        ]
    d = Daemon(
        [str(binary), *args, "-qmp", f"unix:{qmp},server=on,wait=off"],
        "qemu-devices" if machine else "qemu",
        env={"PATH": "/usr/bin:/bin"},
        log_dir=where,
    ).start()
    for _ in range(300):
        if qmp.exists():
            break
        if not d.alive():
            raise RuntimeError(f"QEMU exited: {d.log_path.read_text()[-500:]}")
        time.sleep(0.1)
    wait_agent(d.pid)
    return d, qmp


def alive(daemon: Daemon, qmp: Path) -> bool:
    """Returns whether QEMU runs and answers QMP."""
    if not daemon.alive():
        return False
    try:
        q = QMP(str(qmp))
        q.cmd("query-status")
        q.close()
    except (OSError, EOFError):
        return False
    return True


def run_fixes(pkg: Package, fixes: list[Fix], results: Path) -> list[dict[str, Any]]:
    """Returns one result per QEMU fix of ``fixes``."""
    src, binary, skipped, rewound = level([f for f in pkg.fixes if f in fixes])
    out_dir = results / "qemu"
    out_dir.mkdir(parents=True, exist_ok=True)
    daemon, qmp = start_qemu(binary)
    rows = []
    try:
        for fix in fixes:
            k = key(fix)
            t0 = time.monotonic()
            r: dict[str, Any] = {}
            if k in skipped:
                r["build"] = {"result": "not tried", "message": skipped[k]}
            else:
                pbx = out_dir / f"{k}.pbx"
                diff = LEVEL / "diffs" / f"{k}.diff"
                shutil.copyfile(diff, out_dir / diff.name)
                log(f"qemu {k}: build, apply under load, probe")
                r["build"] = build_patch(fix, src, diff, binary, pbx, qemu=True)
                if r["build"]["result"] == "built":
                    probe = PROBES.get(fix.probe) if fix.probe else None
                    if probe is not None and probe.machine:
                        # The device's own QEMU, started for this fix and stopped after.
                        daemon.stop()
                        daemon, qmp = start_qemu(binary, probe.machine)
                    elif not daemon.alive() or daemon.name != "qemu":
                        daemon.stop()
                        daemon, qmp = start_qemu(binary)
                    extra = {"qmp": str(qmp), "vnc": str(VNC), "qtest": str(QTEST)}
                    ctx = Ctx(fix, src, 0, daemon, extra)
                    load = [sys.executable, str(HERE / "load/qmp_client.py"), "--qmp", str(qmp)]
                    r["apply"] = apply_remove(ctx, pbx, load, probe)
                    r["qemu_alive_at_end"] = alive(daemon, qmp)
            row = {
                "program": "qemu",
                "version": pkg.version,
                "fix": k,
                "ident": fix.ident,
                "patch": f"{fix.patch}: {', '.join(fix.files) or '-'}"
                + (f" (rewound: {', '.join(rewound[k])})" if rewound.get(k) else ""),
                "adapted": False,
                "shape": fix.shape,
                "what": fix.what,
                "probe": fix.probe,
                "note": fix.note,
                "unexercised": fix.unexercised,
                "level": str(src),
                **r,
                "seconds": round(time.monotonic() - t0, 1),
            }
            row["verdict"] = verdict(fix, row)
            if row["verdict"] == "failed" and r["build"]["result"] == "not tried":
                row["verdict"] = "not-tried"
            log(f"qemu {k}: {row['verdict']}")
            rows.append(row)
    finally:
        daemon.stop()
    return rows
