"""Tests of the `patchbox` command line: show, config, error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from helpers import BUILD_ID, ROOT, make_patch
from patchbox import config
from patchbox.arch import Arch, host_arch, iter_arches
from patchbox.cli.main import cli
from patchbox.cli.render import printable
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS, patch_cflags
from patchbox.format.layout import save_patch


@pytest.fixture
def patch_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.pbx"
    save_patch(make_patch(), path)
    return path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(mix_stderr=False).invoke(cli, list(args), env=env, catch_exceptions=False)


def assert_one_error_line(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("patchbox: error: ")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


# -- show -----------------------------------------------------------------------------------


def test_show(patch_file: Path) -> None:
    result = run("show", str(patch_file))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "patch     answer-42" in out
    assert f"build-id  {BUILD_ID.hex()}" in out
    assert "text 22, data 4, bss 16" in out
    assert "compute  target 0x1139  replacement text+0x6, 8 bytes" in out
    assert "fix-ups   3 (ABS64 IMPORT 1, PC32 EXE 2)" in out
    assert "imports   puts" in out
    assert "source:compute  app.c" in out
    lines = out.splitlines()
    mov = next(line for line in lines if "mov" in line)
    assert "b8 2a 00 00 00" in mov and "eax, 0x2a" in mov and "PC32 EXE 0x400c" in mov
    assert any(line.strip().endswith("ret") for line in lines)
    assert sum(1 for line in lines if line.strip().endswith("nop")) == 2


def test_show_json(patch_file: Path) -> None:
    result = run("show", "--json", str(patch_file))
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["name"] == "answer-42" and d["build_id"] == BUILD_ID.hex()
    assert (d["text_size"], d["data_size"], d["bss_size"]) == (22, 4, 16)
    assert d["fixups"] == {"total": 3, "by_kind": {"ABS64 IMPORT": 1, "PC32 EXE": 2}}
    assert d["imports"] == ["puts"]
    assert d["meta"] == {"tool": "test", "source:compute": "app.c"}
    (fn,) = d["functions"]
    assert (fn["symbol"], fn["target"], fn["new_offset"], fn["new_size"]) == (
        "compute",
        0x1139,
        6,
        8,
    )
    assert [(i["offset"], i["mnemonic"]) for i in fn["disassembly"]] == [
        (6, "nop"),
        (7, "nop"),
        (8, "mov"),
        (13, "ret"),
    ]
    assert fn["disassembly"][2]["bytes"] == "b82a000000"
    assert len(fn["disassembly"][2]["fixups"]) == 2


# -- errors ---------------------------------------------------------------------------------


def test_show_missing_file(tmp_path: Path) -> None:
    assert_one_error_line(
        run("show", str(tmp_path / "nope.pbx")), "cannot read patch file", "nope.pbx"
    )


def test_show_corrupt_file(patch_file: Path) -> None:
    data = bytearray(patch_file.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the payload
    patch_file.write_bytes(bytes(data))
    assert_one_error_line(run("show", str(patch_file)), "integrity hash mismatch", str(patch_file))


def test_apply_corrupt_file_sends_nothing(patch_file: Path, tmp_path: Path) -> None:
    data = bytearray(patch_file.read_bytes())
    data[70] ^= 0xFF
    patch_file.write_bytes(bytes(data))
    # the socket does not exist: the file must be refused before connecting
    assert_one_error_line(
        run("apply", "-s", str(tmp_path / "sock"), str(patch_file)), "integrity hash mismatch"
    )


def test_not_a_patch_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pbx"
    path.write_bytes(b"\x7fELF" + bytes(100))
    assert_one_error_line(run("show", str(path)), "not a patchbox patch file")


@pytest.mark.parametrize(
    "command", [["info"], ["list"], ["test"], ["debug", "on"], ["remove", "x"]]
)
def test_no_such_pid(command: list[str]) -> None:
    assert_one_error_line(run(*command, "-p", str(2**22 + 4321)), "no process with pid")


def test_no_socket(tmp_path: Path, patch_file: Path) -> None:
    sock = tmp_path / "sandbox-sock1"
    assert_one_error_line(
        run("apply", "-s", str(sock), str(patch_file)),
        "no agent socket",
        str(sock),
        "patchbox config --libs",
    )


def test_pid_without_agent() -> None:
    """A live process with no agent: the message names the pid and what was tried."""
    pid = os.getpid()
    result = run("info", "-p", str(pid), env={"PATCHBOX_SOCK_DIR": "/nonexistent-dir"})
    exe_dir = os.path.dirname(os.readlink(f"/proc/{pid}/exe"))
    assert_one_error_line(
        result,
        f"no agent socket for pid {pid}: ",
        f"no sandbox-sock{pid} listening in /proc/{pid}/net/unix",
        f"/nonexistent-dir/sandbox-sock{pid} (PATCHBOX_SOCK_DIR)",
        f"{exe_dir}/sandbox-sock{pid} (the executable's directory)",
        "patchbox config --libs",
    )


@pytest.mark.parametrize(
    "args",
    [
        ["info"],
        ["info", "-p", "1", "-s", "/x"],
        ["debug", "-p", "1", "maybe"],
        ["config"],
        ["config", "--cflags", "--preload"],
        ["remove", "--vm", "vm1", "fix"],  # --vm narrows --all
        ["remove", "-p", "1", "--all", "--vm", "vm1", "fix"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).exit_code == 2


def test_vm_goes_with_all(patch_file: Path) -> None:
    result = run("apply", "-p", "1", "--vm", "vm1", str(patch_file))
    assert result.exit_code == 2 and "--vm" in result.stderr


def test_names_from_processes_are_printed_escaped() -> None:
    assert printable("web-01 é") == "web-01 é"
    assert printable("a\x1b[2Jb\nc\x00") == "a\\x1b[2Jb\\nc\\x00"


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("patchbox, version ")


def test_main_entry_point_as_subprocess(tmp_path: Path) -> None:
    """The console script itself: exit status and a single stderr line."""
    exe = ROOT / ".venv" / "bin" / "patchbox"
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run(
        [str(exe), "show", str(tmp_path / "missing.pbx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("patchbox: error: ")


# -- config ---------------------------------------------------------------------------------


def test_config_cflags() -> None:
    result = run("config", "--cflags")
    assert result.exit_code == 0
    # The headers come from the installed package, never from a source checkout's agent/.
    assert result.stdout.split() == [*PATCH_CFLAGS, f"-I{config.agent_home() / 'include'}"]
    assert (config.agent_home() / "include" / "patchbox" / "sandbox.h").is_file()


@pytest.mark.parametrize("arch", iter_arches(), ids=lambda a: a.name)
def test_pkg_config_gives_what_config_gives(arch: Arch) -> None:
    """For each architecture the package was built for (the checkout's bootstrap
    cross-builds the other one): pkg-config's words are config's, less build-info."""
    native = arch == host_arch()
    if not native and not (config.agent_home() / arch.name / "lib" / "libsandbox.o").is_file():
        pytest.skip(f"no {arch.name} agent in this package ({arch.multiarch}-gcc missing)")
    where = [] if native else ["--arch", arch.name]
    pcdir = run("config", *where, "--pkgconfigdir")
    assert pcdir.exit_code == 0, pcdir.stderr
    assert (Path(pcdir.stdout.strip()) / "patchbox.pc").is_file()
    env = {**os.environ, "PKG_CONFIG_PATH": pcdir.stdout.strip()}
    proc = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "patchbox"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ours = run("config", *where, "--cflags", "--libs").stdout.split()
    assert patch_cflags(arch)[0] in proc.stdout.split()

    # Same words, paths compared normalised; the build-info object is config's only extra.
    def norm(words: list[str]) -> list[str]:
        return [
            f"-I{os.path.normpath(w[2:])}"
            if w.startswith("-I/")
            else os.path.normpath(w)
            if w.startswith("/")
            else w
            for w in words
        ]

    info = [w for w in ours if Path(w).name.startswith("build-info-")]
    assert len(info) == 1
    assert norm(proc.stdout.split()) == norm([w for w in ours if w not in info])
    assert run("config", "--pkgconfigdir", "--libs").exit_code == 2


@pytest.fixture
def fake_agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An agent dir with placeholder objects (for what `--libs` prints) and a private cache."""
    directory = tmp_path / "agent-build"
    directory.mkdir()
    for name in ("libsandbox.o", "sandbox-listen.o", "libsandbox.so"):
        (directory / name).write_bytes(b"")
    monkeypatch.setenv("PATCHBOX_AGENT_DIR", str(directory))
    monkeypatch.setenv("PATCHBOX_CACHE", str(tmp_path / "cache"))
    return directory


def test_config_libs_layout(fake_agent_dir: Path, tmp_path: Path) -> None:
    result = run("config", "--libs")
    assert result.exit_code == 0, result.stderr
    words = result.stdout.split()
    assert words[:2] == [
        str(fake_agent_dir / "libsandbox.o"),
        str(fake_agent_dir / "sandbox-listen.o"),
    ]
    assert Path(words[2]).parent == tmp_path / "cache" and Path(words[2]).is_file()
    assert words[3:] == LINK_FLAGS
    both = run("config", "--cflags", "--libs").stdout.split()
    assert both[: len(PATCH_CFLAGS)] == PATCH_CFLAGS


def test_config_preload_fake(fake_agent_dir: Path) -> None:
    result = run("config", "--preload")
    assert (result.exit_code, result.stdout) == (0, f"{fake_agent_dir / 'libsandbox.so'}\n")


def test_config_agent_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHBOX_AGENT_DIR", str(tmp_path / "empty"))
    assert_one_error_line(run("config", "--libs"), "agent not built", "PATCHBOX_AGENT_DIR")
    assert_one_error_line(run("config", "--preload"), "agent not built")


def test_config_other_arch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--arch`: another architecture's entry flags; its agent from `<arch>/lib` of the
    package (PATCHBOX_AGENT_DIR is the host's only), refused naming the cross compiler
    when the package has none; an unknown name refused; no pkg-config directory."""
    other = next(a for a in iter_arches() if a != host_arch())
    want = [other.entry.flag, *other.entry.cflags, "-ffunction-sections", "-fdata-sections"]
    assert want == patch_cflags(other)
    assert run("config", "--arch", other.name, "--cflags").stdout.split()[: len(want)] == want
    assert run("config", "--arch", host_arch().name, "--cflags").stdout.split()[:3] == PATCH_CFLAGS
    monkeypatch.setattr(config, "agent_home", lambda: tmp_path / "_agent")
    monkeypatch.setenv("PATCHBOX_AGENT_DIR", str(tmp_path / "ignored"))
    assert_one_error_line(
        run("config", "--arch", other.name, "--libs"),
        f"{tmp_path}/_agent/{other.name}/lib/libsandbox.o missing",
        f"{other.multiarch}-gcc",
    )
    assert_one_error_line(run("config", "--arch", "sparc", "--cflags"), "unknown architecture")
    assert_one_error_line(
        run("config", "--arch", other.name, "--pkgconfigdir"),
        f"{tmp_path}/_agent/{other.name}/lib/libsandbox.o missing",
        f"{other.multiarch}-gcc",
    )


READER_C = r"""
#include <stdio.h>
#include <stdint.h>
struct patchbox_build_info { uint32_t magic, size; const char *version, *git, *date, *cflags; };
extern const struct patchbox_build_info patchbox_build_info;
int main(void) {
    const struct patchbox_build_info *b = &patchbox_build_info;
    printf("%08x %u\n%s\n%s\n%s\n%s\n", b->magic, b->size, b->version, b->git, b->date, b->cflags);
    return 0;
}
"""


def build_and_read(obj: Path, tmp_path: Path) -> list[str]:
    """Returns the lines a program linked with the build-info ``obj`` prints about it."""
    src = tmp_path / "reader.c"
    src.write_text(READER_C)
    exe = tmp_path / "reader"
    subprocess.run(
        ["gcc", "-fPIE", "-pie", str(src), str(obj), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout.decode("utf-8")
    return out.split("\n")


def test_build_info_object(
    fake_agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not a git repository
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    tricky = 'v1.2 "rc" \\path ??= é\ttab'
    result = run("config", "--libs", "--app-version", tricky, "--app-cflags", '-O2 -DX="y"')
    assert result.exit_code == 0, result.stderr
    obj = Path(result.stdout.split()[2])
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    (line,) = [s for s in symbols.splitlines() if s.endswith(" patchbox_build_info")]
    assert line.split()[1] in {"D", "R"}  # defined, global, not weak
    assert build_and_read(obj, tmp_path) == [
        "50425849 40",
        tricky,
        "unknown",
        "2023-11-14T22:13:20Z",
        '-O2 -DX="y"',
        "",
    ]


def test_build_info_defaults_and_git(
    fake_agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.c").write_text("int x;\n")
    subprocess.run([*git, "add", "a.c"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATCHBOX_APP_VERSION", "9.9")
    monkeypatch.delenv("CFLAGS", raising=False)
    info = config.collect_build_info()
    assert (info.version, info.git, info.cflags) == ("9.9", head, config.cflags())
    (repo / "untracked.c").write_text("")
    assert config.collect_build_info().git == head  # untracked files do not make it dirty
    (repo / "a.c").write_text("int y;\n")
    monkeypatch.setenv("CFLAGS", "-O1")
    info = config.collect_build_info()
    assert (info.git, info.cflags) == (head + "-dirty", "-O1")
    lines = build_and_read(config.build_info_object(info), tmp_path)
    assert lines[1:3] == ["9.9", head + "-dirty"] and lines[4] == "-O1"


def test_build_info_object_is_cached_by_content(fake_agent_dir: Path) -> None:
    info = config.BuildInfo("1", "g", "2024-01-01T00:00:00Z", "-O2")
    first = config.build_info_object(info)
    assert config.build_info_object(info) == first
    other = config.build_info_object(config.BuildInfo("2", "g", "2024-01-01T00:00:00Z", "-O2"))
    assert other != first and other.is_file()


def test_c_string() -> None:
    assert config.c_string('a"b\\c?\n\x01é') == '"a\\"b\\\\c\\?\\012\\001\\303\\251"'


# -- with the real agent build ---------------------------------------------------------------


def test_config_with_real_agent(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATCHBOX_AGENT_DIR", str(agent_dir))
    monkeypatch.setenv("PATCHBOX_CACHE", str(tmp_path / "cache"))
    preload = run("config", "--preload")
    assert preload.exit_code == 0, preload.stderr
    assert Path(preload.stdout.strip()) == agent_dir / "libsandbox.so"
    libs = run("config", "--libs", "--app-version", "3.1")
    assert libs.exit_code == 0, libs.stderr
    cflags = run("config", "--cflags").stdout.split()
    src = tmp_path / "app.c"
    src.write_text("int compute(int x) { return x + 1; }\nint main(void) { return compute(-1); }\n")
    exe = tmp_path / "app"
    subprocess.run(
        ["gcc", "-O2", "-fPIE", "-pie", *cflags, str(src), "-o", str(exe), *libs.stdout.split()],
        check=True,
        capture_output=True,
    )
    symbols = subprocess.run(["nm", str(exe)], check=True, capture_output=True, text=True).stdout
    assert any(
        s.endswith(" patchbox_build_info") and s.split()[1] in "DR" for s in symbols.splitlines()
    )


# -- shell completion --------------------------------------------------------------------------


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef")])
def test_completion_script(shell: str, marker: str) -> None:
    result = run("completion", shell)
    assert result.exit_code == 0 and marker in result.stdout


def test_completion_completes_commands_and_options() -> None:
    exe = Path(sys.executable).parent / "patchbox"

    def complete(words: str, cword: int) -> list[str]:
        env = {
            **os.environ,
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "_PATCHBOX_COMPLETE": "bash_complete",
        }
        out = subprocess.run(
            [str(exe)], env=env, capture_output=True, text=True, check=False
        ).stdout
        return [line.split(",", 1)[1] for line in out.splitlines()]

    assert complete("patchbox ap", 1) == ["apply"]
    assert complete("patchbox apply --tr", 2) == ["--trust-dir"]


def test_build_checks_before_building(tmp_path: Path) -> None:
    """An invalid name or a binary without build-id is refused before any build runs."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text("all:\n\ttouch built-once\n")
    diff = tmp_path / "fix.patch"
    diff.write_text("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n")
    exe = tmp_path / "prog"
    subprocess.run(
        ["gcc", "-x", "c", "-", "-o", str(exe)],
        input="int main(void){return 0;}",
        text=True,
        check=True,
    )
    bad = run(
        "build",
        "--source",
        str(src),
        "--diff",
        str(diff),
        "--binary",
        str(exe),
        "--name",
        "bad name!",
    )
    assert bad.exit_code == 1 and "invalid patch name" in bad.stderr
    nobid = tmp_path / "nobid"
    subprocess.run(
        ["gcc", "-Wl,--build-id=none", "-x", "c", "-", "-o", str(nobid)],
        input="int main(void){return 0;}",
        text=True,
        check=True,
    )
    res = run("build", "--source", str(src), "--diff", str(diff), "--binary", str(nobid))
    assert res.exit_code == 1 and "no GNU build-id" in res.stderr
    assert not list(tmp_path.rglob("built-once")), "a build ran before the checks"


def test_constants_kept_light_agree_with_their_sources() -> None:
    """The CLI keeps copies of two constants so that short commands need not import the
    client or the signing module; they must not drift."""
    import patchbox.cli.main as cli_main
    from patchbox import signing
    from patchbox.cli import common
    from patchbox.protocol import client

    assert cli_main.DEFAULT_TIMEOUT == client.DEFAULT_TIMEOUT
    assert str(signing.DEFAULT_TRUST_DIR) == common.DEFAULT_TRUST_DIR


def test_version_without_click(tmp_path: Path) -> None:
    """`patchbox --version` is answered before click (or any subcommand) is imported,
    with click's own wording."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['patchbox', '--version']; from patchbox.cli import main; "
        "main(); print(sorted(m for m in sys.modules if m.startswith(('click', 'patchbox.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    version_line, modules = out.stdout.splitlines()
    from patchbox import __version__

    assert version_line == f"patchbox, version {__version__}"
    assert modules == "['patchbox.cli']", modules
