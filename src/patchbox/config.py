"""What `patchbox config` prints: compile flags, link inputs and the preload library.

The agent is installed inside the package, ``patchbox/_agent/`` (``lib/`` objects,
archive, preload library and ``pkgconfig/patchbox.pc``; ``include/patchbox/`` headers):
the wheel's build step puts it there (setup.py, tools/install_agent.py), and so does
scripts/bootstrap.sh in a checkout. ``$PATCHBOX_AGENT_DIR`` names another ``lib``
directory (a test build with another SANDBOX_ALLOC). ``libs()`` also generates, with the
C compiler, a small object defining ``patchbox_build_info`` (<patchbox/sandbox.h>) that
records the program's version, git revision, link date and cflags; INFO reports them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from patchbox import safefs
from patchbox.arch import Arch, get_arch, host_arch
from patchbox.errors import ConfigError, ElfError
from patchbox.flags import LINK_FLAGS, patch_cflags

__all__ = [
    "BUILD_INFO_MAGIC",
    "AGENT_OBJECTS",
    "BuildInfo",
    "agent_home",
    "agent_dir",
    "include_dir",
    "pkgconfig_dir",
    "cflags",
    "libs",
    "preload",
    "cache_dir",
    "collect_build_info",
    "build_info_source",
    "build_info_object",
    "c_string",
    "target_arch",
]

BUILD_INFO_MAGIC = 0x50425849  # "IXBP" little-endian: struct patchbox_build_info.magic
AGENT_OBJECTS = ("libsandbox.o", "sandbox-listen.o")
_NOT_BUILT = "reinstall patchbox; in a source checkout run scripts/bootstrap.sh"


@dataclass(frozen=True)
class BuildInfo:
    """The facts recorded in ``patchbox_build_info``."""

    version: str
    git: str
    date: str
    cflags: str


def agent_home() -> Path:
    """Returns ``patchbox/_agent`` of the installed package (it may not exist)."""
    return Path(str(importlib.resources.files("patchbox").joinpath("_agent")))


def target_arch(name: str | None = None) -> Arch:
    """Returns the architecture called ``name`` (``--arch``), or this host's; raises
    ConfigError for one patchbox does not know."""
    try:
        return get_arch(name) if name else host_arch()
    except ElfError as err:
        raise ConfigError(str(err)) from err


def agent_dir(arch: Arch | None = None) -> Path:
    """Returns the directory holding the agent built for ``arch`` (default: this host's:
    ``lib/``, or ``$PATCHBOX_AGENT_DIR``; another: ``<arch>/lib/``, cross-built when the
    package was); raises ConfigError if not built."""
    native = arch is None or arch == host_arch()
    env = os.environ.get("PATCHBOX_AGENT_DIR") if native else None
    if env:
        path = Path(env)
    elif native or arch is None:
        path = agent_home() / "lib"
    else:
        path = agent_home() / arch.name / "lib"
    missing = [name for name in AGENT_OBJECTS if not (path / name).is_file()]
    if missing:
        if env:
            hint = "check PATCHBOX_AGENT_DIR"
        elif native or arch is None:
            hint = _NOT_BUILT
        else:
            hint = (
                f"the package was built without {arch.multiarch}-gcc: install Debian's "
                f"gcc-{arch.multiarch}, then reinstall patchbox (a checkout: "
                f"scripts/bootstrap.sh)"
            )
        raise ConfigError(f"patchbox agent not built: {path / missing[0]} missing ({hint})")
    return path


def include_dir() -> Path | None:
    """Returns the directory holding <patchbox/patch.h> (PATCHBOX_ORIGINAL) and
    <patchbox/sandbox.h>, or None if this installation has no agent headers."""
    path = agent_home() / "include"
    return path if (path / "patchbox" / "patch.h").is_file() else None


def pkgconfig_dir(arch: Arch | None = None) -> Path:
    """Returns the directory holding ``patchbox.pc`` of ``arch`` (default: this host's,
    ``lib/pkgconfig``; another's: ``<arch>/lib/pkgconfig`` beside its cross-built agent);
    raises ConfigError if missing."""
    if arch is None or arch == host_arch():
        path = agent_home() / "lib" / "pkgconfig"
    else:
        agent_dir(arch)  # its error names the cross compiler a package was built without
        path = agent_home() / arch.name / "lib" / "pkgconfig"
    if not (path / "patchbox.pc").is_file():
        raise ConfigError(f"{path / 'patchbox.pc'} missing ({_NOT_BUILT})")
    return path


def cflags(arch: Arch | None = None) -> str:
    """Returns the compile flags of a patchable program and of its patch objects for
    ``arch`` (default: this host's), with the agent's headers on the include path (for
    PATCHBOX_ORIGINAL in patch sources; the same for every architecture)."""
    inc = include_dir()
    return " ".join(patch_cflags(arch) + ([f"-I{inc}"] if inc else []))


def preload(arch: Arch | None = None) -> Path:
    """Returns the path of libsandbox.so (for LD_PRELOAD); raises ConfigError if missing."""
    path = agent_dir(arch) / "libsandbox.so"
    if not path.is_file():
        raise ConfigError(f"{path} missing ({_NOT_BUILT})")
    return path


def libs(
    app_version: str | None = None,
    app_cflags: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    arch: Arch | None = None,
) -> str:
    """Returns the link inputs of a patchable program for ``arch`` (default: this
    host's): agent objects, a fresh build-info object and the link flags. (Paths are
    printed unquoted, for ``$(...)`` in make/sh.)"""
    directory = agent_dir(arch)
    info = collect_build_info(app_version, app_cflags, cwd, arch)
    obj = build_info_object(info, arch)
    return " ".join([*(str(directory / name) for name in AGENT_OBJECTS), str(obj), *LINK_FLAGS])


def cache_dir() -> Path:
    """Returns (creating it) ``$PATCHBOX_CACHE`` or ``~/.cache/patchbox``."""
    env = os.environ.get("PATCHBOX_CACHE")
    path = (
        Path(env)
        if env
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchbox"
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create cache directory {path}: {err.strerror}") from err
    return path


def _git_revision(cwd: str | os.PathLike[str] | None) -> str:
    """Returns ``git rev-parse HEAD`` of ``cwd`` plus ``-dirty`` if tracked files changed,
    or ``unknown`` outside a repository (or without git)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return "unknown"
        rev = head.stdout.strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if status.returncode == 0 and status.stdout.strip():
        rev += "-dirty"
    return rev


def _now_utc() -> str:
    """Returns the link date, UTC ISO 8601 (``SOURCE_DATE_EPOCH`` wins, for reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.fromtimestamp(int(epoch), UTC) if epoch and epoch.isdigit() else datetime.now(UTC)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def collect_build_info(
    app_version: str | None = None,
    app_cflags: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    arch: Arch | None = None,
) -> BuildInfo:
    """Returns the build facts: version (option, $PATCHBOX_APP_VERSION, "unknown"), git
    revision of ``cwd``, the date now, cflags (option, $CFLAGS, the patchbox cflags of
    ``arch``)."""
    version = (
        app_version
        if app_version is not None
        else os.environ.get("PATCHBOX_APP_VERSION", "unknown")
    )
    flags = app_cflags if app_cflags is not None else os.environ.get("CFLAGS", cflags(arch))
    return BuildInfo(
        version=version or "unknown", git=_git_revision(cwd), date=_now_utc(), cflags=flags
    )


def c_string(text: str) -> str:
    """Returns ``text`` as a C string literal (UTF-8; quotes, backslashes, ``?`` and
    non-printable bytes escaped in 3-digit octal so no escape can swallow what follows)."""
    out = ['"']
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?':
            out.append("\\" + ch)
        elif ch.isascii() and ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    out.append('"')
    return "".join(out)


def build_info_source(info: BuildInfo) -> str:
    """Returns the C source of an object defining ``patchbox_build_info``.

    The struct is declared here rather than by including sandbox.h, whose declaration is
    weak: a definition after it would be weak too.
    """
    return f"""/* generated by patchbox config --libs; do not edit */
#include <stdint.h>

struct patchbox_build_info {{
    uint32_t magic;
    uint32_t size;
    const char *version, *git, *date, *cflags;
}};

__attribute__((visibility("default")))
const struct patchbox_build_info patchbox_build_info = {{
    .magic = {BUILD_INFO_MAGIC:#x}u,
    .size = sizeof(struct patchbox_build_info),
    .version = {c_string(info.version)},
    .git = {c_string(info.git)},
    .date = {c_string(info.date)},
    .cflags = {c_string(info.cflags)},
}};
"""


def build_info_object(info: BuildInfo, arch: Arch | None = None) -> Path:
    """Returns the path of a compiled build-info object for ``info``, named by the hash
    of its source and compiler (so concurrent builds never clash) in :func:`cache_dir`.
    Compiled with ``$CC`` (default gcc) for this host, with Debian's cross compiler
    (``<multiarch>-gcc``) for another ``arch``."""
    source = build_info_source(info)
    if arch is None or arch == host_arch():
        cc, key = shlex.split(os.environ.get("CC") or "gcc"), source
    else:
        cc = [f"{arch.multiarch}-gcc"]
        key = f"{source}/* {cc[0]} */"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    directory = cache_dir()
    # The object is linked into the user's programs: a cache others can write to would
    # let them choose code for it (its name is predictable).
    st = directory.stat()
    why = safefs.unsafe_reason(st, safefs.trusted_owners())
    if why:
        raise ConfigError(
            f"cache directory {directory} {why}: others could plant the build-info object "
            f"linked into your programs; set PATCHBOX_CACHE to a directory of your own"
        )
    obj = directory / f"build-info-{digest}.o"
    if obj.is_file():
        return obj
    fd, tmp_obj = tempfile.mkstemp(prefix=f".build-info-{digest}-", suffix=".o", dir=directory)
    os.close(fd)
    # mkstemp: created new (O_EXCL), never through a planted link.
    fd, c_name = tempfile.mkstemp(prefix=f".build-info-{digest}-", suffix=".c", dir=directory)
    c_file = Path(c_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        cmd = [*cc, "-c", "-fPIC", "-O0", "-x", "c", str(c_file), "-o", tmp_obj]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except FileNotFoundError as err:
            raise ConfigError(f"C compiler {cc[0]!r} not found (set CC)") from err
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise ConfigError(f"compiling the build-info object failed: {first}")
        os.replace(tmp_obj, obj)  # atomic: a concurrent build writes identical bytes
    finally:
        c_file.unlink(missing_ok=True)
        Path(tmp_obj).unlink(missing_ok=True)
    return obj
