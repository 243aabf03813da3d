"""The agent on aarch64, under qemu-user (tier `aarch64`; docs/aarch64.md).

The agent is cross-built with Debian's gcc-aarch64-linux-gnu (`make -C agent
ARCH=aarch64`) and linked into a cross-built program (a64_target.c), which runs under
`qemu-aarch64`. This x86-64 process talks to its agent over the socket, as to any other:
INFO, the self-test, a hand-made aarch64 patch of a real function applied and removed
(with and without `bti c` at the entry), a patch for another architecture refused, and
10,000 apply/remove cycles while four threads call the function. The program's own
`entry` command reads the patchable entry back, to show it byte-identical after a remove.

Skipped, saying which, when the cross compiler or qemu-aarch64 is missing (setup.sh and
scripts/bootstrap.sh install both). The program is linked with the cross toolchain's own
loader path and run without `-L`: qemu-user's `-L` prefix also answers `open("/")` with
the prefix directory, and the agent, which walks to its socket directory from `/`
without following links, then finds no such directory (docs/aarch64.md).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from a64 import CC, LIBDIR, A64Target, missing_toolchain
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from helpers import ROOT
from patchbox.arch import Machine
from patchbox.errors import AgentError
from patchbox.format.layout import encode_apply_body
from patchbox.format.model import Function, Patch
from patchbox.wire import ErrorCode, RedirectKind

pytestmark = pytest.mark.aarch64

SOURCE = Path(__file__).with_name("a64_target.c")
CFLAGS = [
    "-O2",
    "-fPIE",
    "-fpatchable-function-entry=5,4",
    "-ffunction-sections",
    "-fdata-sections",
]
NOP, BTI_C, RET = 0xD503201F, 0xD503245F, 0xD65F03C0
CYCLES = int(os.environ.get("PATCHBOX_AARCH64_CYCLES", "10000"))
FAR = 0x20000000  # link-time address of far_answer: 512 MiB past the rest, beyond a B


@pytest.fixture(scope="module")
def agent_a64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns the directory of the agent cross-built for aarch64."""
    missing = missing_toolchain()
    if missing:
        pytest.skip(f"needs the aarch64 cross toolchain and qemu-user: missing {missing}")
    out = tmp_path_factory.mktemp("agent-aarch64")
    cmd = ["make", "-C", str(ROOT / "agent"), "ARCH=aarch64", f"OUT={out}", "-j2"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def build(agent: Path | None, out: Path, *, bti: bool = False, far: bool = True) -> Path:
    """Returns ``out``: a64_target.c cross-built with the patchable entry, the agent's two
    objects linked in (none without ``agent``: for LD_PRELOAD of libsandbox.so), with
    ``bti`` `bti c` at every function entry (-mbranch-protection=standard), and with
    ``far`` far_answer linked at FAR (else beside the rest)."""
    agent_in = [str(agent / "libsandbox.o"), str(agent / "sandbox-listen.o")] if agent else []
    cmd = [
        CC,
        *CFLAGS,
        *(["-mbranch-protection=standard"] if bti else []),
        "-pie",
        str(SOURCE),
        *agent_in,
        "-Wl,--build-id=sha1",
        *([f"-Wl,--section-start=farcode={FAR:#x}"] if far else []),
        "-pthread",
        "-ldl",
        f"-Wl,--dynamic-linker={LIBDIR}/ld-linux-aarch64.so.1",
        f"-Wl,-rpath={LIBDIR}",
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bti"])
def a64_exe(
    request: pytest.FixtureRequest, agent_a64: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Returns the program, built with or without `bti c` at its entries."""
    d = tmp_path_factory.mktemp("a64bti" if request.param else "a64")
    exe = build(agent_a64, d / "a64_target", bti=request.param)
    entry = symbol_bytes(exe, "answer", 16, 24)[1]
    assert (entry[16:20] == words(BTI_C)) == request.param, entry.hex()
    return exe


@pytest.fixture()
def a64(a64_exe: Path) -> Iterator[A64Target]:
    t = A64Target(a64_exe)
    yield t
    alive = t.proc.poll() is None
    err = t.stop()
    assert alive, f"the aarch64 target died during the test: {err}"


def symbol_bytes(exe: Path, name: str, before: int, length: int) -> tuple[int, bytes, bytes]:
    """Returns (link-time address of ``name``, ``length`` file bytes from ``before`` bytes
    ahead of it, the build-id)."""
    with exe.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        syms = symtab.get_symbol_by_name(name)
        assert syms, f"{exe}: no symbol {name}"
        addr = syms[0]["st_value"]
        data = b""
        for seg in elf.iter_segments("PT_LOAD"):
            lo = seg["p_vaddr"]
            if lo <= addr - before and addr - before + length <= lo + seg["p_filesz"]:
                data = seg.data()[addr - before - lo : addr - before - lo + length]
        note = elf.get_section_by_name(".note.gnu.build-id")
        assert isinstance(note, NoteSection)
        build_id = next(n for n in note.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")["n_desc"]
    return addr, data, bytes.fromhex(build_id)


def words(*insns: int) -> bytes:
    return b"".join(struct.pack("<I", i) for i in insns)


def returning(value: int) -> bytes:
    """Returns aarch64 code with the 4+1 NOP entry, then `mov w0, #value; ret`."""
    assert 0 <= value < 0x10000
    return words(NOP, NOP, NOP, NOP, NOP, 0x52800000 | value << 5, RET)


def a64_patch(exe: Path, name: str, value: int, symbol: str = "answer") -> Patch:
    """Returns a patch of the program's `answer` (x + 1; or ``symbol``) returning
    ``value``: the replacement's entry after its own 16 bytes of NOPs, `skip` 4 past a
    `bti c`."""
    addr, entry, build_id = symbol_bytes(exe, symbol, 16, 24)
    skip = 4 if entry[16:20] == words(BTI_C) else 0
    fn = Function(symbol, addr, 16, 12, entry, RedirectKind.PATCHABLE_ENTRY, skip)
    return Patch(name, build_id, returning(value), [fn], machine=Machine.AARCH64)


def test_agent_serves_under_qemu(a64: A64Target) -> None:
    """The agent thread runs in the emulated process: its socket, the peer check
    (SO_PEERCRED of this x86-64 client), INFO naming the architecture and the guest
    binary, and the self-test patching and restoring a function of the agent's own."""
    _addr, _entry, build_id = symbol_bytes(a64.exe, "answer", 16, 24)
    with a64.client() as c:
        info = c.info()
        assert (info["arch"], info["machine"]) == ("aarch64", "183")
        assert info["exe"] == str(a64.exe) and info["build_id"] == build_id.hex()
        assert info["sync_core"] in ("sync_core", "expedited", "none")
        passed, detail = c.test()
    assert passed, detail
    assert "entry bytes restored" in detail, detail


def test_found_by_pid(a64: A64Target) -> None:
    """`patchbox info -p PID` finds the emulated process's socket (its pid is qemu's)."""
    out = subprocess.run(
        [str(ROOT / ".venv/bin/patchbox"), "info", "-p", str(a64.proc.pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "aarch64" in out, out


def test_apply_and_remove(a64: A64Target) -> None:
    """A real redirect on aarch64: `answer` returns 4242 after APPLY, 42 again after
    REMOVE, and its patchable entry is byte-identical to the file's afterwards."""
    patch = a64_patch(a64.exe, "a64fix", 4242)
    original = patch.functions[0].expected.hex()
    assert a64.cmd("entry") == original
    assert a64.cmd("call 41") == "42"
    with a64.client() as c:
        c.apply(encode_apply_body(patch))
        assert a64.cmd("call 41") == "4242"
        site = patch.functions[0].skip + 16
        b = int.from_bytes(bytes.fromhex(a64.cmd("entry"))[site : site + 4], "little")
        assert b >> 26 == 0b000101, f"{b:08x} is not a B"  # the site holds `B replacement`
        assert [p.name for p in c.list()] == ["a64fix"]
        c.remove("a64fix")
    assert a64.cmd("call 41") == "42"
    assert a64.cmd("entry") == original


def test_far_target_through_the_veneer(a64: A64Target) -> None:
    """far_answer lies 512 MiB from the sandbox, beyond a B: the agent writes the veneer
    `ldr x16, entry-8; br x16; .quad new` into the dead padding, then `B entry-16` at the
    site. Remove puts the site's NOP back and leaves the veneer (dead); the next far apply
    reuses it with a new literal."""
    patch = a64_patch(a64.exe, "farfix", 4242, "far_answer")
    original = bytes.fromhex(a64.cmd("farentry"))
    assert original == patch.functions[0].expected
    site = patch.functions[0].skip + 16
    with a64.client() as c:
        if c.info()["sync_core"] != "sync_core":
            pytest.skip("the far veneer needs membarrier SYNC_CORE, which this host lacks")
        placed = c.apply(encode_apply_body(patch))
        assert a64.cmd("far 40") == "4242"
        now = bytes.fromhex(a64.cmd("farentry"))
        assert now[:8] == words(0x58000050, 0xD61F0200)  # ldr x16, .+8; br x16
        assert int.from_bytes(now[8:16], "little") == placed.text_addr + 16
        assert now[site : site + 4] == words(0x14000000 | ((-site >> 2) & 0x3FFFFFF))
        c.remove("farfix")
        assert a64.cmd("far 40") == "42"
        left = bytes.fromhex(a64.cmd("farentry"))
        assert left[16:] == original[16:] and left[:8] == now[:8]  # the site back, veneer left
        c.apply(encode_apply_body(a64_patch(a64.exe, "farfix2", 4343, "far_answer")))
        assert a64.cmd("far 40") == "4343"
        c.remove("farfix2")
    assert a64.cmd("far 40") == "42"


def test_stacked_patches(a64: A64Target) -> None:
    """A second patch of the same function redirects the first one's replacement entry;
    removal goes top-down."""
    first, second = a64_patch(a64.exe, "first", 4242), a64_patch(a64.exe, "second", 4343)
    with a64.client() as c:
        c.apply(encode_apply_body(first))
        c.apply(encode_apply_body(second))
        assert a64.cmd("call 41") == "4343"
        with pytest.raises(AgentError) as err:
            c.remove("first")
        assert err.value.code == ErrorCode.NOT_TOP
        c.remove("second")
        assert a64.cmd("call 41") == "4242"
        c.remove("first")
    assert a64.cmd("call 41") == "42"


def test_patch_for_x86_64_refused(a64: A64Target) -> None:
    """A patch claiming x86-64 reaches the aarch64 agent: refused naming both
    architectures, nothing written."""
    patch = replace(a64_patch(a64.exe, "wrongarch", 4242), machine=Machine.X86_64)
    before = a64.cmd("entry")
    with a64.client() as c, pytest.raises(AgentError) as err:
        c.apply(encode_apply_body(patch))
    assert err.value.code == ErrorCode.WRONG_MACHINE
    assert "is for x86_64 (e_machine 62), this process is aarch64 (e_machine 183)" in str(err.value)
    assert a64.cmd("entry") == before
    assert a64.cmd("call 41") == "42"


@pytest.mark.parametrize("symbol", ["answer", "far_answer"])
def test_hot_threads_cycles(a64: A64Target, symbol: str) -> None:
    """Four threads call the function without pause while the patch is applied and removed
    CYCLES times (PATCHBOX_AARCH64_CYCLES, 10,000 by default): every call returns the
    old or the new result, none anything else, and the process lives. `answer` is
    redirected by a B, `far_answer` through the veneer (its literal rewritten at each
    apply while threads may be loading it)."""
    patch = a64_patch(a64.exe, "hot", 4242, symbol)
    body = encode_apply_body(patch)
    far = symbol == "far_answer"
    assert a64.cmd(f"hot{'far' if far else ''} 4") == "hot 4"
    with a64.client() as c:
        for _ in range(CYCLES):
            c.apply(body)
            c.remove("hot")
    old, new, other = (int(w) for w in a64.cmd("counts").split()[1::2])
    print(f"aarch64 under qemu-user, {symbol}: {CYCLES} cycles, old {old} new {new} other {other}")
    assert other == 0
    assert old > 0 and new > 0
    entry, built = (
        bytes.fromhex(a64.cmd("farentry" if far else "entry")),
        patch.functions[0].expected,
    )
    if far:  # a far redirect leaves its veneer in the padding (dead); the rest is as built
        assert entry[:8] == words(0x58000050, 0xD61F0200) and entry[16:] == built[16:]
    else:
        assert entry == built


def test_without_membarrier(agent_a64: Path, tmp_path: Path) -> None:
    """A kernel without membarrier (a64_nomembarrier.c preloaded: syscall() answers
    ENOSYS for it): INFO says sync_core none, a near redirect is still published (one
    NOP <-> B store, safe without it) and removed; the far veneer is refused, nothing
    written."""
    shim = tmp_path / "nomembarrier.so"
    src = SOURCE.with_name("a64_nomembarrier.c")
    subprocess.run([CC, "-O2", "-shared", "-fPIC", str(src), "-o", str(shim)], check=True)
    exe = build(agent_a64, tmp_path / "a64_target")
    t = A64Target(exe, preload=shim)
    try:
        far_before = t.cmd("farentry")
        with t.client() as c:
            assert c.info()["sync_core"] == "none"
            c.apply(encode_apply_body(a64_patch(exe, "near", 4242)))
            assert t.cmd("call 41") == "4242"
            c.remove("near")
            with pytest.raises(AgentError) as err:
                c.apply(encode_apply_body(a64_patch(exe, "far", 4242, "far_answer")))
        assert err.value.code == ErrorCode.FIXUP_OVERFLOW
        assert "out of reach (sync=none)" in str(err.value)
        assert t.cmd("call 41") == "42" and t.cmd("far 40") == "42"
        assert t.cmd("farentry") == far_before
    finally:
        assert t.proc.poll() is None
        t.stop()


def test_preloaded_agent_near_the_executable(agent_a64: Path, tmp_path: Path) -> None:
    """libsandbox.so preloaded into a program built with the flags but without the agent
    maps its sandbox within a B's reach of the executable (mmap with a hint near its
    text); its self-test patches the target it puts there, and a patch applies."""
    exe = build(None, tmp_path / "a64_plain", far=False)
    t = A64Target(exe, preload=agent_a64 / "libsandbox.so")
    try:
        with t.client() as c:
            info = c.info()
            passed, detail = c.test()
            c.apply(encode_apply_body(a64_patch(t.exe, "sofix", 4242)))
            assert t.cmd("call 41") == "4242"
            c.remove("sofix")
        assert passed, detail
        assert abs(int(info["sandbox_addr"], 16) - int(info["load_bias"], 16)) < 128 << 20
        assert t.cmd("call 41") == "42"
    finally:
        assert t.proc.poll() is None
        t.stop()
