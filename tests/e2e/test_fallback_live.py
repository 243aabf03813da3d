"""The entry-jump fallback in a real process (docs/redirect.md, "Functions without the padding").

The target is built WITHOUT -fpatchable-function-entry (but -ffunction-sections, PIE, the
agent linked through `patchbox config --libs`); its `answer` starts with a 7-byte `lea` at
a 16-aligned entry, so the entry jump is accepted. Everything is observed from outside:
the process's answers on stdout and its code through /proc/PID/mem.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from live import Target

from helpers import APP_VERSION, elf_symbol, run_tool
from patchbox.config import libs
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS
from patchbox.format.layout import load_patch, save_patch
from patchbox.wire import RedirectKind

pytestmark = pytest.mark.process
PLAIN = ["-O2", "-fPIE", "-ffunction-sections", "-fdata-sections", "-fcf-protection=none"]

SOURCE = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((noipa, aligned(16))) int answer(int x) { return x * @MUL@ + 3; }
__attribute__((noipa, aligned(16))) int other(int x) { return x - 1; }
int main(void) {
    char line[128], name[64];
    int arg;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        arg = 0;
        if (sscanf(line, "%63s %d", name, &arg) < 1)
            continue;
        if (!strcmp(name, "answer"))
            printf("%d\n", answer(arg));
        else if (!strcmp(name, "other"))
            printf("%d\n", other(arg));
        else
            printf("unknown %s\n", name);
    }
    return 0;
}
"""


run = run_tool


def build(out: Path, mul: str, *, padded: bool = False, obj: bool = False) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / "fb.c"  # same file name for the program and its patch objects
    src.write_text(SOURCE.replace("@MUL@", mul))
    cmd = ["gcc", *PLAIN, *(PATCH_CFLAGS if padded else [])]
    if obj:
        cmd += ["-c", str(src), "-o", str(out)]
    else:
        cmd += [
            "-pie",
            str(src),
            "-o",
            str(out),
            *LINK_FLAGS,
            *shlex.split(libs(app_version=APP_VERSION, app_cflags=" ".join(PLAIN))),
        ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def plain_exe(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> Path:
    return build(tmp_path_factory.mktemp("fallback") / "fb", "7")


@pytest.fixture()
def target(plain_exe: Path) -> Iterator[Target]:
    t = Target(plain_exe)
    yield t
    alive = t.alive()
    t.stop()
    assert alive, f"target died during the test: {t.stderr_text}"


def symbol(exe: Path, name: str) -> tuple[int, int]:
    sym = elf_symbol(exe, name)
    return sym["st_value"], sym["st_size"]


def bias(target: Target) -> int:
    exe = str(Path(target.exe).resolve())
    with open(f"/proc/{target.pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == exe and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise AssertionError("executable mapping not found")


def function_bytes(target: Target, name: str) -> bytes:
    addr, size = symbol(target.exe, name)
    return target.read(bias(target) + addr, size)


def extract(obj: Path, exe: Path, name: str, *extra: str) -> Path:
    out = obj.parent / f"{name}.pbx"
    run("extract-patch", "--function", "answer", "--name", name, *extra, "-o", out, obj, exe)
    return out


def test_target_has_no_padding(target: Target, plain_exe: Path) -> None:
    addr, _size = symbol(plain_exe, "answer")
    entry = target.read(bias(target) + addr - 6, 9)
    assert entry[:8] != b"\x90" * 8
    assert addr % 16 == 0 and entry[6] == 0x8D  # lea: 7 bytes at a 16-aligned entry


def test_entry_jump_apply_and_remove_restore_bytes(
    target: Target, plain_exe: Path, tmp_path: Path
) -> None:
    before = function_bytes(target, "answer")
    other = function_bytes(target, "other")
    assert target.call("answer", 2) == "17"
    obj = build(tmp_path / "p" / "fb.o", "7 + 1", padded=True, obj=True)
    pbx = extract(obj, plain_exe, "jump")
    [fn] = load_patch(pbx).functions
    assert (fn.kind, fn.skip) == (RedirectKind.ENTRY_JUMP, 0)
    assert len(fn.expected) >= 8 and fn.expected == before[: len(fn.expected)]

    run("patchbox", "apply", "-p", target.pid, pbx)
    assert target.call("answer", 2) == "18"
    assert target.call("other", 2) == "1"
    after = function_bytes(target, "answer")
    assert after[0] == 0xE9 and after[5:] == before[5:]  # only [P, P+5) changed

    run("patchbox", "remove", "-p", target.pid, "jump")
    assert target.call("answer", 2) == "17"
    assert function_bytes(target, "answer") == before
    assert function_bytes(target, "other") == other


def test_unpadded_replacement_and_rule6(target: Target, plain_exe: Path, tmp_path: Path) -> None:
    before = function_bytes(target, "answer")
    plain_obj = build(tmp_path / "a" / "fb.o", "7 + 1", obj=True)
    proc = run(
        "extract-patch",
        "--function",
        "answer",
        "--name",
        "plain",
        "-o",
        tmp_path / "plain.pbx",
        plain_obj,
        plain_exe,
    )
    assert "a later patch of answer cannot be stacked on this one" in proc.stderr
    [fn] = load_patch(tmp_path / "plain.pbx").functions
    assert fn.new_offset < 6
    padded_a = extract(
        build(tmp_path / "b" / "fb.o", "7 + 1", padded=True, obj=True), plain_exe, "padded"
    )
    top = extract(build(tmp_path / "c" / "fb.o", "7 + 2", padded=True, obj=True), plain_exe, "top")

    run("patchbox", "apply", "-p", target.pid, tmp_path / "plain.pbx")
    assert target.call("answer", 2) == "18"
    refused = run("patchbox", "apply", "-p", target.pid, top, check=False)
    assert refused.returncode != 0
    assert "cannot stack on plain (rule 6)" in refused.stderr
    assert "redirected by an entry jump" in refused.stderr
    assert target.call("answer", 2) == "18"
    run("patchbox", "remove", "-p", target.pid, "plain")
    assert function_bytes(target, "answer") == before

    # The replacement built with the flags has its own padding: stacking goes on it.
    run("patchbox", "apply", "-p", target.pid, padded_a)
    run("patchbox", "apply", "-p", target.pid, top)
    assert target.call("answer", 2) == "19"
    run("patchbox", "remove", "-p", target.pid, "top")
    assert target.call("answer", 2) == "18"
    run("patchbox", "remove", "-p", target.pid, "padded")
    assert target.call("answer", 2) == "17"
    assert function_bytes(target, "answer") == before


def test_agent_refuses_wrong_expected_and_misaligned_point(
    target: Target, plain_exe: Path, tmp_path: Path
) -> None:
    snapshot = target.code_snapshot()
    pbx = extract(build(tmp_path / "p" / "fb.o", "7 + 1", padded=True, obj=True), plain_exe, "good")
    patch = load_patch(pbx)
    [fn] = patch.functions
    wrong = bytearray(fn.expected)
    wrong[2] ^= 0xFF
    bad = tmp_path / "bad.pbx"
    save_patch(
        dataclasses.replace(
            patch, name="bad", functions=[dataclasses.replace(fn, expected=bytes(wrong))]
        ),
        bad,
    )
    refused = run("patchbox", "apply", "-p", target.pid, bad, check=False)
    assert refused.returncode != 0
    assert "bytes at target differ from the patch's expected bytes: answer+0x2" in refused.stderr

    # A record whose P is byte 4 of its word (hand-made: extract-patch refuses it by rule 4).
    addr, _ = symbol(plain_exe, "answer")
    real = target.read(bias(target) + addr + 4, 8)
    shifted = dataclasses.replace(fn, target=addr + 4, expected=real)
    mis = tmp_path / "mis.pbx"
    save_patch(dataclasses.replace(patch, name="mis", functions=[shifted]), mis)
    refused = run("patchbox", "apply", "-p", target.pid, mis, check=False)
    assert refused.returncode != 0
    assert "rule 4, alignment" in refused.stderr

    assert target.code_snapshot() == snapshot
    assert target.call("answer", 2) == "17"
    assert run("patchbox", "list", "-p", target.pid, "--json").stdout.strip() == "[]"
