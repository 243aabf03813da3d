"""aarch64 patches built by extract-patch, applied end to end under qemu-user (tier
`aarch64`; docs/aarch64.md, "What ran under qemu-user").

A small service is cross-built with `patchbox config --arch aarch64 --cflags --libs`
and run under `qemu-aarch64`. Its `render` calls another function of the program,
reads and writes globals and statics of 1, 2, 4, 8 and 16 bytes and two thread-local
variables (local-exec, initial-exec), reads another file's global through the GOT and
calls libc's `snprintf` (through the patch's veneer stub): every aarch64 fix-up type. A fixed
`render` is compiled, `extract-patch` builds the patch from the fixed object and the
running binary, `patchbox apply -p PID` (this x86-64 client) switches the process, whose
answers on stdout change; `patchbox remove` brings the old ones and the old bytes back.
Then two patches stacked, and the patch of the x86-64 twin of the same program refused.
"""

from __future__ import annotations

import difflib
import os
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from a64 import CC, LOADER, A64Target, missing_toolchain
from elftools.elf.elffile import ELFFile

from helpers import BIN, elf_symbol, gnu_build_id, run_tool, run_with_tools
from patchbox.arch import Machine
from patchbox.errors import AgentError
from patchbox.format.layout import encode_apply_body, load_patch
from patchbox.format.model import Fixup, Function, Patch
from patchbox.wire import ErrorCode, FixupBase, FixupSection, FixupType, RedirectKind

pytestmark = pytest.mark.aarch64

BTI_C = (0xD503245F).to_bytes(4, "little")

SVC = r"""
#include <stddef.h>
#include <stdio.h>

typedef int v4 __attribute__((vector_size(16)));

extern int limit;              /* main.c's: reached through the GOT */
int total;                     /* a global of this file */
static int calls;              /* a static */
static long chars;             /* a 64-bit static */
unsigned char last;            /* a byte */
static short hits;             /* a 16-bit static */
static v4 vec;                 /* a q register's worth */
static __thread int mine;      /* thread-local, this file's: local-exec */
extern __thread int theirs;    /* thread-local, main.c's: initial-exec */

__attribute__((noinline)) int scale(int x)
{
	__asm__ volatile("");
	return x * 2;
}

__attribute__((noinline)) int render(char *buf, size_t len, int n)
{
	calls++;
	total += n;
	last = (unsigned char)n;
	hits++;
	vec += (v4){n, 1, 2, 3};
	mine += n;
	theirs += 1;
	int r = snprintf(buf, len, "old %d calls=%d total=%d limit=%d", scale(n), calls, total, limit);
	chars += r;
	return r;
}

long rendered(void)
{
	return chars;
}

int wide(void)
{
	return last * 1000000 + hits * 1000 + vec[0];
}

int tls(void)
{
	return mine * 1000 + theirs;
}
"""
# The fixes: each changes what `render` prints.
FIX1 = (
    SVC.replace('"old %d', '"new %d')
    .replace("scale(n), calls", "scale(n) + 1, calls")
    .replace("(v4){n, 1", "(v4){10 * n, 1")
    .replace("mine += n;", "mine += 10 * n;")
)
FIX2 = SVC.replace('"old %d', '"newer %d').replace("scale(n), calls", "scale(n) + 2, calls")

MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int limit = 7;
__thread int theirs;
int render(char *buf, size_t len, int n);
long rendered(void);
int wide(void);
int tls(void);

int main(void)
{
	char line[128], out[256];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (strncmp(line, "render ", 7) == 0) {
			render(out, sizeof(out), atoi(line + 7));
			printf("%s\n", out);
		} else if (strncmp(line, "chars", 5) == 0) {
			printf("%ld\n", rendered());
		} else if (strncmp(line, "wide", 4) == 0) {
			printf("%d\n", wide());
		} else if (strncmp(line, "tls", 3) == 0) {
			printf("%d\n", tls());
		} else if (strncmp(line, "text", 4) == 0) {
			/* render's entry and first instructions, as the process runs them */
			const unsigned char *p = (const unsigned char *)render - 16;
			for (int i = 0; i < 64; i++)
				printf("%02x", p[i]);
			printf("\n");
		}
	}
	return 0;
}
"""


def _config(*args: str) -> list[str]:
    return shlex.split(run_tool("patchbox", "config", *args).stdout)


@dataclass(frozen=True)
class Build:
    """The service built for one architecture, and the fixed objects."""

    exe: Path
    fixed: tuple[Path, ...]  # svc.o of FIX1, FIX2


def _build(
    d: Path, cc: str, arch: list[str], link: list[str], extra: tuple[str, ...] = ()
) -> Build:
    """Returns the service (built from SVC and MAIN in ``d``) and FIX1's and FIX2's
    objects, compiled by ``cc`` with `patchbox config ARCH --cflags` (and ``extra``) and
    linked with `--libs`."""
    cflags = ["-O2", "-g", "-fPIE", *_config(*arch, "--cflags"), *extra]
    objs = []
    for name, source in (("old", SVC), ("fix1", FIX1), ("fix2", FIX2)):
        (d / name).mkdir()
        (d / name / "svc.c").write_text(source)  # the same file name: its statics
        subprocess.run([cc, *cflags, "-c", "svc.c", "-o", "svc.o"], cwd=d / name, check=True)
        objs.append(d / name / "svc.o")
    (d / "main.c").write_text(MAIN)
    subprocess.run([cc, *cflags, "-c", "main.c", "-o", "main.o"], cwd=d, check=True)
    libs = _config(*arch, "--libs", "--app-version", "a64-e2e")
    cmd = [cc, "-pie", "main.o", str(objs[0]), *libs, "-ldl", *link, "-o", "svc"]
    subprocess.run(cmd, cwd=d, check=True)
    return Build(d / "svc", tuple(objs[1:]))


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bti"])
def a64_svc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """Returns the service for aarch64, with `bti c` (and pointer authentication) at
    its entries or without: -mbranch-protection=standard."""
    missing = missing_toolchain()
    if missing:
        pytest.skip(f"needs the aarch64 cross toolchain and qemu-user: missing {missing}")
    extra = ("-mbranch-protection=standard",) if request.param else ()
    d = tmp_path_factory.mktemp("a64svc")
    build = _build(d, CC, ["--arch", "aarch64"], LOADER, extra)
    assert (bytes.fromhex(_file_text(build.exe))[16:20] == BTI_C) == request.param
    return build


@pytest.fixture()
def svc(a64_svc: Build) -> Iterator[A64Target]:
    t = A64Target(a64_svc.exe)
    yield t
    alive = t.proc.poll() is None
    err = t.stop()
    assert alive, f"the aarch64 service died during the test: {err}"


def _extract(build: Build, fix: int, out: Path) -> Path:
    run_tool("extract-patch", "-f", "render", build.fixed[fix], build.exe, "-o", out)
    return out


def _file_text(exe: Path) -> str:
    """Returns the 64 bytes from render-16 in the file (what `text` prints unpatched)."""
    at = elf_symbol(exe, "render")["st_value"] - 16
    with exe.open("rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments("PT_LOAD"):
            if seg["p_vaddr"] <= at < seg["p_vaddr"] + seg["p_filesz"]:
                return seg.data()[at - seg["p_vaddr"] : at - seg["p_vaddr"] + 64].hex()
    raise AssertionError("render not in a loaded segment")


def test_config_names_the_aarch64_agent() -> None:
    """`patchbox config --arch aarch64`: the 5,4 entry, 8-aligned functions, the
    cross-built agent objects and a build-info object for aarch64."""
    if missing_toolchain():
        pytest.skip("needs the aarch64 cross toolchain")
    cflags = _config("--arch", "aarch64", "--cflags")
    assert cflags[:4] == [
        "-fpatchable-function-entry=5,4",
        "-falign-functions=8",
        "-ffunction-sections",
        "-fdata-sections",
    ]
    libs = _config("--arch", "aarch64", "--libs")
    objs = [Path(a) for a in libs if a.endswith(".o")]
    assert [p.name for p in objs[:2]] == ["libsandbox.o", "sandbox-listen.o"]
    assert objs[0].parent.parent.name == "aarch64"
    for obj in objs:
        assert obj.read_bytes()[18:20] == (183).to_bytes(2, "little"), obj  # EM_AARCH64


def test_extracted_patch_applied_and_removed(
    svc: A64Target, a64_svc: Build, tmp_path: Path
) -> None:
    """extract-patch → apply through the x86-64 client: the answers change (the call,
    the global, the statics, the GOT, snprintf all the running program's); remove: the
    old answers and render's bytes as in the file."""
    pbx = _extract(a64_svc, 0, tmp_path / "fix1.pbx")
    patch = load_patch(pbx)
    assert patch.machine == Machine.AARCH64
    used = {fx.type for fx in patch.fixups}
    assert {
        FixupType.BRANCH26,
        FixupType.ADR_PAGE,
        FixupType.ADD_LO12,
        FixupType.LDST8_LO12,
        FixupType.LDST16_LO12,
        FixupType.LDST32_LO12,
        FixupType.LDST64_LO12,
        FixupType.LDST128_LO12,
        FixupType.ABS64,
    } <= used, used
    before = svc.cmd("text")
    assert before == _file_text(a64_svc.exe)
    assert svc.cmd("render 5") == "old 10 calls=1 total=5 limit=7"
    pid = svc.proc.pid
    out = run_tool("patchbox", "apply", "-p", pid, pbx).stdout
    assert f"applied fix1 (id 1) to pid {pid}: render" in out
    assert svc.cmd("render 5") == "new 11 calls=2 total=10 limit=7"
    assert svc.cmd("text") != before
    listed = run_tool("patchbox", "list", "-p", pid).stdout
    assert "fix1" in listed
    run_tool("patchbox", "remove", "-p", pid, "fix1")
    assert svc.cmd("render 6") == "old 12 calls=3 total=16 limit=7"
    assert svc.cmd("text") == before
    # The static written by old, new and old code alike: one variable, the program's.
    seen = ("old 10 calls=1 total=5 limit=7", "new 11 calls=2 total=10 limit=7")
    assert svc.cmd("chars") == str(sum(map(len, seen)) + len("old 12 calls=3 total=16 limit=7"))
    # The byte, the short and the vector likewise: last 6, hits 3, vec[0] 5 + 50 + 6.
    assert svc.cmd("wide") == "6003061"
    # The thread-local variables: the program's (TP offsets in the code and in a slot).
    assert svc.cmd("tls") == "61003"
    assert patch.meta["tls:mine"].startswith("local-exec: TP offset ")
    assert patch.meta["tls:theirs"].startswith("initial-exec: TP offset ")


def test_stacked_extracted_patches(svc: A64Target, a64_svc: Build, tmp_path: Path) -> None:
    """A second patch of render on the first (the first replacement's own 4+1 entry);
    removal top-down, NOT_TOP otherwise; the bytes back at the end."""
    one = _extract(a64_svc, 0, tmp_path / "fix1.pbx")
    two = _extract(a64_svc, 1, tmp_path / "fix2.pbx")
    before = svc.cmd("text")
    pid = svc.proc.pid
    run_tool("patchbox", "apply", "-p", pid, one)
    run_tool("patchbox", "apply", "-p", pid, two)
    assert svc.cmd("render 1") == "newer 4 calls=1 total=1 limit=7"
    refused = run_tool("patchbox", "remove", "-p", pid, "fix1", check=False)
    assert refused.returncode != 0 and "fix2" in refused.stderr, refused.stderr
    run_tool("patchbox", "remove", "-p", pid, "fix2")
    assert svc.cmd("render 1") == "new 3 calls=2 total=2 limit=7"
    run_tool("patchbox", "remove", "-p", pid, "fix1")
    assert svc.cmd("render 1") == "old 2 calls=3 total=3 limit=7"
    assert svc.cmd("text") == before


def test_patch_of_the_x86_64_twin_refused(
    svc: A64Target, a64_svc: Build, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same program and fix built for this host: `apply` refuses it naming both
    machines; sent to the agent anyway, the agent refuses it (WRONG_MACHINE), nothing
    written."""
    twin = _build(tmp_path_factory.mktemp("x86svc"), "gcc", [], [])
    pbx = _extract(twin, 0, twin.exe.parent / "fix1.pbx")
    assert load_patch(pbx).machine != Machine.AARCH64
    before = svc.cmd("text")
    done = run_tool("patchbox", "apply", "-p", svc.proc.pid, pbx, check=False)
    assert done.returncode == 1
    assert "(e_machine 62), pid" in done.stderr and "is aarch64 (e_machine 183)" in done.stderr
    assert "WRONG_MACHINE" in done.stderr
    with svc.client() as c, pytest.raises(AgentError) as err:
        c.apply(encode_apply_body(load_patch(pbx)))
    assert err.value.code == ErrorCode.WRONG_MACHINE
    assert svc.cmd("text") == before
    assert svc.cmd("render 2") == "old 4 calls=1 total=2 limit=7"


# Hand-made replacement code for the agent's fix-up checks: the 4+1 entry, then one
# instruction of each class at a known offset (never run: every case is refused).
NOP, RET = 0xD503201F, 0xD65F03C0
_CODE = {
    20: 0x94000000,  # bl .
    24: 0x52800020,  # mov w0, #1
    28: 0xB9400001,  # ldr w1, [x0]
    32: 0x90000000,  # adrp x0, .
    36: 0xF9400001,  # ldr x1, [x0]
    40: RET,
}
_TEXT = b"".join(w.to_bytes(4, "little") for w in (NOP,) * 5 + tuple(_CODE.values()))
T, D = FixupSection.TEXT, FixupSection.DATA


def _fx(offset: int, ftype: FixupType, addend: int = 0, section: FixupSection = T) -> Fixup:
    return Fixup(section, ftype, FixupBase.ABS, offset, addend)


# (fix-ups, the agent's error, words of its message)
BAD_FIXUPS: dict[str, tuple[list[Fixup], ErrorCode, str]] = {
    "branch26-on-mov": (
        [_fx(24, FixupType.BRANCH26)],
        ErrorCode.BAD_FIXUP,
        "type 3 at text+0x18 is not on a B or BL",
    ),
    "adr-page-on-bl": ([_fx(20, FixupType.ADR_PAGE)], ErrorCode.BAD_FIXUP, "not on an ADRP"),
    "add-lo12-on-ldr": ([_fx(28, FixupType.ADD_LO12)], ErrorCode.BAD_FIXUP, "not on an ADD"),
    "ldst64-on-32-bit-ldr": (
        [_fx(28, FixupType.LDST64_LO12)],
        ErrorCode.BAD_FIXUP,
        "not on an 8-byte LDR/STR",
    ),
    "ldst8-on-64-bit-ldr": (
        [_fx(36, FixupType.LDST8_LO12)],
        ErrorCode.BAD_FIXUP,
        "not on a 1-byte LDR/STR",
    ),
    "branch26-unaligned": (
        [_fx(22, FixupType.BRANCH26)],
        ErrorCode.BAD_FIXUP,
        "not on an instruction word of the text",
    ),
    "branch26-in-data": (
        [_fx(0, FixupType.BRANCH26, section=D)],
        ErrorCode.BAD_FIXUP,
        "data+0x0 is not on an instruction word of the text",
    ),
    "branch26-out-of-reach": (
        [_fx(20, FixupType.BRANCH26, 1 << 40)],
        ErrorCode.FIXUP_OVERFLOW,
        "beyond a B/BL's +-128 MiB",
    ),
    "adr-page-out-of-reach": (
        [_fx(32, FixupType.ADR_PAGE, 1 << 50)],
        ErrorCode.FIXUP_OVERFLOW,
        "beyond an ADRP's +-4 GiB",
    ),
    "ldst64-misaligned": (
        [_fx(36, FixupType.LDST64_LO12, 0x1004)],
        ErrorCode.FIXUP_OVERFLOW,
        "not a multiple of the access size",
    ),
    # Every value is checked before anything is written: good fix-ups first, then one
    # that does not fit.
    "good-then-ldst32-misaligned": (
        [
            Fixup(T, FixupType.ADR_PAGE, FixupBase.TEXT, 32, 0),
            Fixup(T, FixupType.BRANCH26, FixupBase.TEXT, 20, 40),
            _fx(28, FixupType.LDST32_LO12, 0x1002),
        ],
        ErrorCode.FIXUP_OVERFLOW,
        "fix-up 2 (type 8) at text+0x1c",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FIXUPS), ids=list(BAD_FIXUPS))
def test_agent_refuses_bad_fixups(svc: A64Target, a64_svc: Build, case: str) -> None:
    """The aarch64 agent checks each instruction fix-up's class when the request is read
    and its value before writing: refused, naming the fix-up, nothing written."""
    fixups, code, words = BAD_FIXUPS[case]
    entry = bytes.fromhex(_file_text(a64_svc.exe))[:32]
    addr = elf_symbol(a64_svc.exe, "render")["st_value"]
    skip = 4 if entry[16:20] == BTI_C else 0
    fn = Function("render", addr, 16, len(_TEXT) - 16, entry, RedirectKind.PATCHABLE_ENTRY, skip)
    build_id = bytes.fromhex(gnu_build_id(a64_svc.exe))
    patch = Patch("bad", build_id, _TEXT, [fn], fixups, data=bytes(8), machine=Machine.AARCH64)
    before = svc.cmd("text")
    with svc.client() as c, pytest.raises(AgentError) as err:
        c.apply(encode_apply_body(patch))
    assert err.value.code == code, err.value
    assert words in err.value.message, err.value.message
    assert svc.cmd("text") == before
    assert svc.cmd("render 3") == "old 6 calls=1 total=3 limit=7"
    with svc.client() as c:
        assert c.list() == []


MAKEFILE = """\
svc: main.o svc.o
\t$(CC) -pie -o $@ main.o svc.o $(LDLIBS)
%.o: %.c
\t$(CC) -O2 -g -fPIE $(CFLAGS) -c $< -o $@
"""


def test_patchbox_build_from_a_diff(tmp_path: Path) -> None:
    """`patchbox build` on a tree built for aarch64 (its compiler from CC): the tree
    rebuilt with the aarch64 flags (the running binary's architecture), the changed
    function found and extracted; applied under qemu, the new answers."""
    missing = missing_toolchain()
    if missing:
        pytest.skip(f"needs the aarch64 cross toolchain and qemu-user: missing {missing}")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "svc.c").write_text(SVC)
    (tree / "main.c").write_text(MAIN)
    (tree / "Makefile").write_text(MAKEFILE)
    libs = " ".join([*_config("--arch", "aarch64", "--libs"), "-ldl", *LOADER])
    env = {"CC": CC, "LDLIBS": libs}
    cflags = " ".join(_config("--arch", "aarch64", "--cflags"))
    run_with_tools("make", f"CC={CC}", f"CFLAGS={cflags}", f"LDLIBS={libs}", cwd=tree)
    diff = "".join(
        difflib.unified_diff(
            SVC.splitlines(keepends=True),
            FIX1.splitlines(keepends=True),
            "a/svc.c",
            "b/svc.c",
        )
    )
    (tmp_path / "fix.patch").write_text(diff)
    pbx = tmp_path / "built.pbx"
    done = subprocess.run(
        [
            str(BIN / "patchbox"),
            "build",
            "--source",
            str(tree),
            "--diff",
            str(tmp_path / "fix.patch"),
        ]
        + ["--binary", "svc", "-o", str(pbx)],
        env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    patch = load_patch(pbx)
    assert patch.machine == Machine.AARCH64
    assert [f.symbol for f in patch.functions] == ["render"]
    t = A64Target(tree / "svc")
    try:
        assert t.cmd("render 5") == "old 10 calls=1 total=5 limit=7"
        run_tool("patchbox", "apply", "-p", t.proc.pid, pbx)
        assert t.cmd("render 5") == "new 11 calls=2 total=10 limit=7"
        run_tool("patchbox", "remove", "-p", t.proc.pid, "built")
        assert t.cmd("render 5") == "old 10 calls=3 total=15 limit=7"
    finally:
        alive = t.proc.poll() is None
        err = t.stop()
    assert alive, err
