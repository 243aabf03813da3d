"""Live patching of a real running process, observed from outside (tier 2: `-m process`;
the aarch64 instances under qemu-user: `-m aarch64`).

Every test starts a real target with the agent linked, changes its behaviour through the
socket with the real CLI, and checks what the process answers on its stdout. Each runs
for both architectures (tests/e2e/arches.py): the target, the patched objects and the
agent cross-built for aarch64 and the program run under qemu-aarch64, the x86-64 client
of this checkout talking to its socket.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arches import on_every_arch
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from live import Target, arch_of

from helpers import APP_VERSION, compile_c, elf_symbol, info_json, render, run_tool
from patchbox.arch import get_arch
from patchbox.config import preload
from patchbox.format.layout import load_patch, save_patch

pytestmark = on_every_arch

run = run_tool


def extract(obj: Path, exe: Path, *functions: str, name: str) -> Path:
    out = obj.parent / f"{name}.pbx"
    args = [a for f in functions for a in ("--function", f)]
    run("extract-patch", *args, "--name", name, "-o", out, obj, exe)
    return out


def info(target: Target) -> dict[str, Any]:
    return info_json(target.pid)


def listing(target: Target) -> list[Any]:
    rows: list[Any] = json.loads(run("patchbox", "list", "-p", target.pid, "--json").stdout)
    return rows


def entry_bytes(target: Target, symbol: str) -> bytes:
    """Returns the patchable entry of ``symbol`` in the running target: [f-6, f+2) on
    x86-64, [f-16, f+4) on aarch64 (the architecture's ``EntryLayout``)."""
    sym = elf_symbol(target.exe, symbol)
    layout = arch_of(target.exe).entry
    at = int(info(target)["load_bias"], 16) + sym["st_value"] - layout.pad
    return target.read(at, len(layout.nops))


# What the compiler emits for a GOT access in a -fPIC object, and for a pointer in data.
GOT_RELOCS = {
    "x86_64": ("R_X86_64_GOTPCRELX", "R_X86_64_REX_GOTPCRELX"),
    "aarch64": ("R_AARCH64_ADR_GOT_PAGE",),
}
ABS64_RELOC = {"x86_64": "R_X86_64_64", "aarch64": "R_AARCH64_ABS64"}


def relocations(obj: Path) -> str:
    """Returns `readelf -rW` of ``obj`` (binutils' readelf reads every architecture)."""
    return subprocess.run(
        ["readelf", "-rW", str(obj)], capture_output=True, text=True, check=True
    ).stdout


def test_target_is_pie(target_exe: Path) -> None:
    with open(target_exe, "rb") as f:
        assert ELFFile(f)["e_type"] == "ET_DYN"


def test_static_helper_apply_list_remove(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    assert target.call("use_helper", 4) == "41"
    before = entry_bytes(target, "use_helper")
    assert before == arch_of(target_exe).entry.nops
    pbx = extract(patched_obj(USE_HELPER="scale(x) + 2"), target_exe, "use_helper", name="helper")

    run("patchbox", "apply", "-p", target.pid, pbx)
    assert target.call("use_helper", 4) == "42"
    assert entry_bytes(target, "use_helper") != before
    [applied] = listing(target)
    assert applied["name"] == "helper"
    assert [f["symbol"] for f in applied["functions"]] == ["use_helper"]

    run("patchbox", "remove", "-p", target.pid, "helper")
    assert target.call("use_helper", 4) == "41"
    assert entry_bytes(target, "use_helper") == before
    assert listing(target) == []


def test_apply_and_remove_report_the_agents_time_as_json(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    pbx = extract(patched_obj(USE_HELPER="scale(x) + 2"), target_exe, "use_helper", name="timed")
    applied = json.loads(run("patchbox", "apply", "-p", target.pid, pbx, "--json").stdout)
    removed = json.loads(run("patchbox", "remove", "-p", target.pid, "timed", "--json").stdout)
    # The agent's own time (APPLY/REMOVE replies' elapsed_ns): under a second, not zero.
    assert 0 < applied["elapsed_ns"] < 1_000_000_000
    assert 0 < removed["elapsed_ns"] < 1_000_000_000
    assert (applied["held_threads"], removed["written"]) == (0, True)


def test_global_keeps_running_state(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    assert [target.call("bump") for _ in range(3)] == ["1", "2", "3"]
    pbx = extract(patched_obj(BUMP_STEP="100"), target_exe, "bump", name="bump100")
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert target.call("bump") == "103"  # the program's own `counter`, not a copy
    run("patchbox", "remove", "-p", target.pid, "bump100")
    assert target.call("bump") == "104"


def test_string_literal_and_snprintf(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    assert target.call("greet") == "hello"
    assert target.call("fmt", 7) == "value=7"
    obj = patched_obj(GREETING="patched greeting", FMT="v2:%d!")
    pbx = extract(obj, target_exe, "greet", "fmt", name="strings")
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert target.call("greet") == "patched greeting"
    assert target.call("fmt", 7) == "v2:7!"
    run("patchbox", "remove", "-p", target.pid, "strings")
    assert target.call("greet") == "hello"
    assert target.call("fmt", 7) == "value=7"


def test_got_slots_from_pic_no_plt_object(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path], arch: str
) -> None:
    """-fPIC -fno-plt: globals and library calls go through the GOT (x86-64's
    GOTPCREL(X), aarch64's ADRP + LDR pair)."""
    obj = patched_obj(extra=["-fPIC", "-fno-plt"], BUMP_STEP="1000", FMT="got:%d")
    relocs = relocations(obj)
    assert any(name in relocs for name in GOT_RELOCS[arch]), relocs
    pbx = extract(obj, target_exe, "bump", "fmt", name="got")
    assert target.call("bump") == "1"
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert (target.call("bump"), target.call("fmt", 3)) == ("1001", "got:3")
    run("patchbox", "remove", "-p", target.pid, "got")
    assert (target.call("bump"), target.call("fmt", 3)) == ("1002", "value=3")


def test_pointer_table_abs64(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path], arch: str
) -> None:
    """A new table of string pointers: absolute 64-bit relocations in copied data."""
    table = 'static const char *const names[] = { "zero", "one", "two" }; return names[x % 3];'
    obj = patched_obj(PICK=table)
    assert ABS64_RELOC[arch] in relocations(obj)
    pbx = extract(obj, target_exe, "pick", name="table")
    assert target.call("pick", 4) == "some"
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert [target.call("pick", i) for i in range(4)] == ["zero", "one", "two", "zero"]
    run("patchbox", "remove", "-p", target.pid, "table")
    assert target.call("pick", 0) == "none"


def test_two_functions_switch_together(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    pbx = extract(
        patched_obj(PAIR_A="1000", PAIR_B="3"), target_exe, "pair_a", "pair_b", name="pair"
    )
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert (target.call("pair_a", 5), target.call("pair_b", 5)) == ("1005", "15")
    run("patchbox", "remove", "-p", target.pid, "pair")
    assert (target.call("pair_a", 5), target.call("pair_b", 5)) == ("6", "10")


def test_stacking_and_removal_order(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    first = extract(patched_obj(STACKED="200"), target_exe, "stacked", name="first")
    second = extract(patched_obj(STACKED="300"), target_exe, "stacked", name="second")
    original = entry_bytes(target, "stacked")
    run("patchbox", "apply", "-p", target.pid, first)
    assert target.call("stacked", 1) == "201"
    run("patchbox", "apply", "-p", target.pid, second)
    assert target.call("stacked", 1) == "301"

    refused = run("patchbox", "remove", "-p", target.pid, "first", check=False)
    assert refused.returncode == 1
    assert "second" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert target.call("stacked", 1) == "301"

    run("patchbox", "remove", "-p", target.pid, "second")
    assert target.call("stacked", 1) == "201"
    run("patchbox", "remove", "-p", target.pid, "first")
    assert target.call("stacked", 1) == "101"
    assert entry_bytes(target, "stacked") == original


def test_info_and_selftest(target: Target, target_exe: Path) -> None:
    facts = info(target)
    assert facts["pid"] == str(target.pid)
    with open(target_exe, "rb") as f:
        note = next(
            n
            for s in ELFFile(f).iter_sections()
            if isinstance(s, NoteSection)
            for n in s.iter_notes()
            if n["n_type"] == "NT_GNU_BUILD_ID"
        )
    assert facts["build_id"] == note["n_desc"]
    assert int(facts["sandbox_size"]) > 0
    assert facts["app_version"] == APP_VERSION
    assert arch_of(target_exe).entry.flag in facts["app_cflags"]  # =8,6 / =5,4
    assert facts["app_build_date"].startswith("20")
    assert facts["agent_version"] and facts["app_git"]
    proc = run("patchbox", "test", "-p", target.pid)
    assert "pass" in proc.stdout.lower()
    assert target.call("use_helper", 4) == "41"


def test_socket_is_private(target: Target) -> None:
    assert oct(os.stat(target.socket).st_mode & 0o777) == "0o600"


def test_already_applied_is_refused_by_cli(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    pbx = extract(patched_obj(USE_HELPER="scale(x) + 3"), target_exe, "use_helper", name="twice")
    run("patchbox", "apply", "-p", target.pid, pbx)
    snapshot = target.code_snapshot()
    again = run("patchbox", "apply", "-p", target.pid, pbx, check=False)
    assert again.returncode == 1 and "already applied" in again.stderr
    assert target.code_snapshot() == snapshot
    assert target.call("use_helper", 4) == "43"


def test_corrupt_patch_file_is_refused(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path], tmp_path: Path
) -> None:
    pbx = extract(patched_obj(USE_HELPER="scale(x) + 3"), target_exe, "use_helper", name="c")
    data = bytearray(pbx.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "corrupt.pbx"
    bad.write_bytes(bytes(data))
    snapshot = target.code_snapshot()
    proc = run("patchbox", "apply", "-p", target.pid, bad, check=False)
    assert proc.returncode == 1 and "corrupt" in proc.stderr
    assert target.code_snapshot() == snapshot


def test_patch_for_another_build_is_refused(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path], tmp_path: Path
) -> None:
    pbx = extract(patched_obj(USE_HELPER="scale(x) + 3"), target_exe, "use_helper", name="other")
    patch = load_patch(pbx)
    patch.build_id = bytes(len(patch.build_id))
    save_patch(patch, tmp_path / "other.pbx")
    snapshot = target.code_snapshot()
    proc = run("patchbox", "apply", "-p", target.pid, tmp_path / "other.pbx", check=False)
    assert proc.returncode == 1 and "build-id" in proc.stderr
    assert target.code_snapshot() == snapshot
    assert target.call("use_helper", 4) == "41"


def test_preloaded_agent(tmp_path: Path, patched_obj: Callable[..., Path], arch: str) -> None:
    """A program built with the flags but without the agent, started with LD_PRELOAD
    (under qemu-user given to the program with -E, not to qemu)."""
    (tmp_path / "plain").mkdir()
    exe = compile_c(render(), tmp_path / "plain" / "target", arch=arch)  # same name: target.c
    t = Target(exe, env={"LD_PRELOAD": str(preload(get_arch(arch)))})
    try:
        assert t.call("use_helper", 4) == "41"
        pbx = extract(
            patched_obj(USE_HELPER="scale(x) * 2", GREETING="preloaded"),
            exe,
            "use_helper",
            "greet",
            name="pre",
        )
        run("patchbox", "apply", "-p", t.pid, pbx)
        assert (t.call("use_helper", 4), t.call("greet")) == ("80", "preloaded")
        assert info(t)["app_version"] == "unknown"  # no build-info object linked
        run("patchbox", "remove", "-p", t.pid, "pre")
        assert (t.call("use_helper", 4), t.call("greet")) == ("41", "hello")
        assert t.alive()
    finally:
        t.stop()


def test_debug_toggle_and_log(target: Target) -> None:
    run("patchbox", "debug", "on", "-p", target.pid)
    assert info(target)["debug"] == "1"
    run("patchbox", "debug", "off", "-p", target.pid)
    assert info(target)["debug"] == "0"
    log = Path(info(target)["log"]).read_text().splitlines()
    assert any("DEBUG" in line.upper() for line in log)
    assert sum("INFO" in line.upper() for line in log) >= 3
