"""The patch store: patches installed for processes that start later.

Layout (docs/host.md, "The patch store")::

    STORE/                        /var/lib/patchbox, or $PATCHBOX_STORE
      <build-id hex>/             one directory per target build
        <seq>-<name>.pbx          the patch file as installed (signature kept);
                                  seq: 20-digit install time in ns, so names sort in
                                  install order (the agent applies them in that order)

Trust rule: every directory on the way and every file must be owned by root (or by the
user running patchbox, for a private store) and writable by nobody else, and no
component of the store's path may be a symbolic link. `patchbox install` refuses a store
that breaks it; the agent (agent/src/sandbox-store.c) checks the same before it applies
anything from it. A file is checked once, when installed (hash, trust directory,
signature: :func:`patchbox.signing.check_trust`); the store is trusted afterwards
because nobody else can write to it.

The store is walked from ``/`` through descriptors (:mod:`patchbox.safefs`); install
writes ``.<file>.<random>.tmp`` with ``O_EXCL | O_NOFOLLOW`` and renames it into place
through the build-id directory's descriptor: an agent starting meanwhile sees the whole
file or none, and a link planted in the store is never written through.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from patchbox import safefs, signing
from patchbox.errors import PatchboxError
from patchbox.format.layout import PatchFile, read_patch_file
from patchbox.wire import MAX_BUILD_ID

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
_SEQ_DIGITS = 20  # the install time in ns, zero-padded: file names sort by it


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


def _unsafe(err: safefs.UnsafePathError, what: str) -> StoreError:
    return StoreError(
        f"{what}: {err}: anyone who can change it could make every new process run their "
        f"code; the store and every directory above it must be owned by root (or this "
        f"user) and writable by nobody else (chmod go-w)"
    )


def _open_store(root: Path, create: bool) -> int | None:
    """Returns a descriptor of the store directory ``root`` reached without following a
    link, every directory on the way checked (created 0755 with ``create``); None when it
    does not exist and ``create`` is false. Raises StoreError naming what is unsafe."""
    try:
        return safefs.walk(
            root,
            owners=safefs.trusted_owners(),
            create_mode=0o755 if create else None,
            missing_ok=True,
        )
    except safefs.UnsafePathError as err:
        raise _unsafe(err, f"store {root}") from err
    except OSError as err:
        raise StoreError(f"cannot open store {root}: {err.strerror}") from err


def check_store(root: Path) -> None:
    """Raises StoreError unless ``root`` and every directory above it are real directories
    (no symbolic link on the way), owned by root (or this user) and writable by nobody
    else; a root-owned sticky directory above it passes, a missing root is fine."""
    fd = _open_store(root, create=False)
    if fd is not None:
        os.close(fd)


def _entry_name(seq: int, name: str) -> str:
    return f"{seq:0{_SEQ_DIGITS}d}-{name}{SUFFIX}"


def _parse_name(filename: str) -> tuple[int, str] | None:
    """Returns (install time ns, patch name) of a store file name, None for other names."""
    stem = filename[: -len(SUFFIX)] if filename.endswith(SUFFIX) else None
    if stem is None or "-" not in stem:
        return None
    seq, _, name = stem.partition("-")
    return (int(seq), name) if seq.isdigit() and len(seq) == _SEQ_DIGITS and name else None


def _is_build_id(name: str) -> bool:
    # Build-ids come from agents' answers too: only hex names are paths in the store.
    return (
        bool(name) and len(name) <= 2 * MAX_BUILD_ID and all(c in "0123456789abcdef" for c in name)
    )


def iter_installed(root: Path, build_id: str | None = None) -> list[Installed]:
    """Returns the installed patches (of one build-id, or all), in install order."""
    out: list[Installed] = []
    if build_id is not None:
        build_id = build_id.lower()
        if not _is_build_id(build_id):
            return out
    try:
        dirs = [root / build_id] if build_id else sorted(p for p in root.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return out
    for d in dirs:
        if not _is_build_id(d.name):
            continue
        try:
            names = sorted(d.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for p in names:
            parsed = _parse_name(p.name)
            if parsed is not None:
                out.append(Installed(parsed[1], d.name, p, parsed[0]))
    return out


def _open_build_dir(rootfd: int, root: Path, bid: str, create: bool) -> int:
    """Returns a descriptor of the store's directory for build-id ``bid`` (created 0755
    with ``create``), checked like the store; FileNotFoundError when missing."""
    try:
        return safefs.open_subdir(
            rootfd,
            bid,
            str(root / bid),
            owners=safefs.trusted_owners(),
            create_mode=0o755 if create else None,
        )
    except safefs.UnsafePathError as err:
        raise _unsafe(err, f"store {root}") from err


def _entries(dirfd: int, name: str) -> list[tuple[int, str]]:
    """Returns (install time, file name) of the files of patch ``name`` in a build-id
    directory, oldest first."""
    out = []
    for filename in os.listdir(dirfd):
        parsed = _parse_name(filename)
        if parsed is not None and parsed[1] == name:
            out.append((parsed[0], filename))
    return sorted(out)


def install(
    file: str,
    *,
    root: Path | None = None,
    trust: signing.Trust | None = None,
    pf: PatchFile | None = None,
) -> tuple[Installed, PatchFile]:
    """Checks patch ``file`` (layout, hash, trust/signature) and stores it under its
    build-id; returns the new entry and the file read. ``pf``: the file already read (its
    bytes are checked and stored, the file is not read again). A patch of the same name
    already installed for that build is replaced (its order is kept).

    Every directory is reached and every file written through descriptors
    (:mod:`patchbox.safefs`): a link planted anywhere is refused or replaced, never
    followed."""
    pf = pf or read_patch_file(file)
    signing.check_trust(pf.data, file, trust or signing.trust_dir())
    root = root or store_root()
    bid = pf.patch.build_id.hex()
    rootfd = _open_store(root, create=True)
    assert rootfd is not None  # created
    try:
        try:
            dirfd = _open_build_dir(rootfd, root, bid, create=True)
        except OSError as err:
            raise StoreError(f"cannot create {root / bid}: {err.strerror}") from err
    finally:
        os.close(rootfd)
    try:
        # One writer at a time per build (another install's temporary is not stale).
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        safefs.sweep_temps(dirfd)  # of an install killed before its rename
        old = _entries(dirfd, pf.patch.name)
        seq = old[0][0] if old else time.time_ns()
        final = _entry_name(seq, pf.patch.name)
        try:
            # Atomic: an agent starting now sees all of it or nothing.
            safefs.replace_file(dirfd, final, pf.data, 0o644)
            for _seq, filename in old:
                if filename != final:
                    os.unlink(filename, dir_fd=dirfd)
            os.fsync(dirfd)
        except OSError as err:
            raise StoreError(f"cannot write {root / bid / final}: {err.strerror}") from err
    finally:
        os.close(dirfd)
    return Installed(pf.patch.name, bid, root / bid / final, seq), pf


def uninstall(
    name: str, *, root: Path | None = None, build_id: str | None = None
) -> list[Installed]:
    """Removes patch ``name`` from the store (of one build-id, or every one); returns what
    was removed. Running processes keep it until `patchbox remove`. Files are removed
    through the checked directories' descriptors."""
    root = root or store_root()
    rootfd = _open_store(root, create=False)
    if rootfd is None:
        return []
    gone: list[Installed] = []
    try:
        if build_id is not None:
            bids = [build_id.lower()] if _is_build_id(build_id.lower()) else []
        else:
            bids = sorted(n for n in os.listdir(rootfd) if _is_build_id(n))
        for bid in bids:
            try:
                dirfd = _open_build_dir(rootfd, root, bid, create=False)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(dirfd, fcntl.LOCK_EX)  # install's lock
                safefs.sweep_temps(dirfd)
                for seq, filename in _entries(dirfd, name):
                    try:
                        os.unlink(filename, dir_fd=dirfd)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        raise StoreError(
                            f"cannot remove {root / bid / filename}: {err.strerror}"
                        ) from err
                    gone.append(Installed(name, bid, root / bid / filename, seq))
            finally:
                os.close(dirfd)
    finally:
        os.close(rootfd)
    return gone
