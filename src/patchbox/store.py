"""The patch store: patches installed for processes that start later.

Layout (docs/host.md, "The patch store")::

    STORE/                        /var/lib/patchbox, or $PATCHBOX_STORE
      <build-id hex>/             one directory per target build
        <seq>-<name>.pbx          the patch file as installed (signature kept);
                                  seq: 20-digit install time in ns, so names sort in
                                  install order (the agent applies them in that order)

Trust rule: every directory on the way and every file must be owned by root (or by the
user running patchbox, for a private store) and writable by nobody else. `patchbox
install` refuses a store that breaks it; the agent (agent/src/sandbox-store.c) checks the
same before it applies anything from it. A file is checked once, when installed (hash,
trust directory, signature: :func:`patchbox.signing.check_trust`); the store is trusted
afterwards because nobody else can write to it.

Install writes ``.<name>.tmp`` and renames it into place: an agent starting meanwhile
sees the whole file or none.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from patchbox import signing
from patchbox.errors import PatchboxError
from patchbox.format.layout import PatchFile, read_patch_file

__all__ = [
    "DEFAULT_STORE",
    "StoreError",
    "Installed",
    "store_root",
    "check_store",
    "install",
    "uninstall",
    "iter_installed",
]

DEFAULT_STORE = Path("/var/lib/patchbox")
SUFFIX = ".pbx"


class StoreError(PatchboxError):
    """The store is unsafe (others can write to it), or an install/uninstall failed."""


@dataclass(frozen=True)
class Installed:
    """One patch of the store."""

    name: str
    build_id: str
    path: Path
    installed_ns: int


def store_root(option: str | os.PathLike[str] | None = None) -> Path:
    """Returns the store: ``option``, else ``$PATCHBOX_STORE``, else /var/lib/patchbox."""
    if option:
        return Path(option)
    env = os.environ.get("PATCHBOX_STORE")
    return Path(env) if env else DEFAULT_STORE


def _check_one(path: Path, st: os.stat_result, what: str) -> None:
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        raise StoreError(
            f"{what} {path} is owned by uid {st.st_uid}, not root"
            f"{'' if os.geteuid() == 0 else f' or uid {os.geteuid()}'}: "
            f"refusing a store another user controls"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(
            f"{what} {path} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): anyone could make every new "
            f"process run their code; chmod go-w {path}"
        )


def check_store(root: Path) -> None:
    """Raises StoreError unless ``root`` and every directory above it are owned by root
    (or this user) and writable by nobody else; a missing root is fine."""
    path = root.absolute()
    chain = [path, *path.parents]
    for p in reversed(chain):
        try:
            st = p.lstat()
        except FileNotFoundError:
            return
        except OSError as err:
            raise StoreError(f"cannot inspect {p}: {err.strerror}") from err
        if stat.S_ISLNK(st.st_mode):
            st = p.stat()
        # /tmp-like directories (sticky, world-writable) may hold a private store below.
        if p != path and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            continue
        _check_one(p, st, "store directory" if p == path else "directory")


def _entry_name(seq: int, name: str) -> str:
    return f"{seq:020d}-{name}{SUFFIX}"


def _parse_entry(path: Path) -> tuple[int, str] | None:
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else None
    if stem is None or "-" not in stem:
        return None
    seq, _, name = stem.partition("-")
    return (int(seq), name) if seq.isdigit() and len(seq) == 20 and name else None


def iter_installed(root: Path, build_id: str | None = None) -> list[Installed]:
    """Returns the installed patches (of one build-id, or all), in install order."""
    out: list[Installed] = []
    try:
        dirs = [root / build_id] if build_id else sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return out
    for d in dirs:
        try:
            names = sorted(d.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for p in names:
            parsed = _parse_entry(p)
            if parsed is not None:
                out.append(Installed(parsed[1], d.name, p, parsed[0]))
    return out


def install(
    file: str, *, root: Path | None = None, trust: signing.Trust | None = None
) -> tuple[Installed, PatchFile]:
    """Checks patch ``file`` (layout, hash, trust/signature) and stores it under its
    build-id; returns the new entry and the file read. A patch of the same name already
    installed for that build is replaced (its order is kept)."""
    pf = read_patch_file(file)
    signing.check_trust(pf.data, file, trust or signing.trust_dir())
    root = root or store_root()
    check_store(root)
    bid = pf.patch.build_id.hex()
    directory = root / bid
    try:
        for d in (root, directory):
            if not d.is_dir():
                d.mkdir(parents=True)
                os.chmod(d, 0o755)  # whatever the umask: writable by its owner only
        _check_one(directory, directory.lstat(), "store directory")
    except OSError as err:
        raise StoreError(f"cannot create {directory}: {err.strerror}") from err
    old = [e for e in iter_installed(root, bid) if e.name == pf.patch.name]
    seq = old[0].installed_ns if old else time.time_ns()
    final = directory / _entry_name(seq, pf.patch.name)
    tmp = directory / f".{final.name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pf.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic: an agent starting now sees all of it or nothing
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {final}: {err.strerror}") from err
    for e in old:
        if e.path != final:
            e.path.unlink(missing_ok=True)
    return Installed(pf.patch.name, bid, final, seq), pf


def uninstall(
    name: str, *, root: Path | None = None, build_id: str | None = None
) -> list[Installed]:
    """Removes patch ``name`` from the store (of one build-id, or every one); returns what
    was removed. Running processes keep it until `patchbox remove`."""
    root = root or store_root()
    check_store(root)
    gone = [e for e in iter_installed(root, build_id) if e.name == name]
    for e in gone:
        try:
            e.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StoreError(f"cannot remove {e.path}: {err.strerror}") from err
    return gone
