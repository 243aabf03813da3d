"""Files and directories reached so that nobody else can redirect or change them.

patchbox often runs as root on paths other users may own: the store, the trust
directory, the agents' socket directories. Whatever is checked and then used is held by a
descriptor (docs/security.md, "Client, host tools and Ansible"):

- a directory is reached from ``/`` one component at a time with
  ``openat(O_NOFOLLOW | O_DIRECTORY)`` and each component is ``fstat``-ed, so a symbolic
  link anywhere on the way is refused (and named), never followed;
- files in it are opened, created, renamed and removed with ``dir_fd=`` that descriptor,
  created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and their mode set with ``fchmod``;
- *safe* means owned by root or by this process's effective uid and writable by nobody
  else (no group or other write bit); a root-owned sticky directory such as ``/tmp`` may
  lie above a safe one (others cannot remove or rename what they do not own there).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator

from patchbox.errors import PatchboxError

__all__ = [
    "UnsafePathError",
    "DIR_FLAGS",
    "trusted_owners",
    "describe",
    "unsafe_reason",
    "walk",
    "open_subdir",
    "open_nofollow",
    "replace_file",
]

# Read-only directory descriptor that can be listed and used as dir_fd.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePathError(PatchboxError):
    """A path could be redirected (a symbolic link on the way, not a directory) or changed
    by someone the caller does not trust (another owner, writable by others)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def trusted_owners() -> frozenset[int]:
    """Returns the uids whose files this process may trust: root and its effective uid."""
    return frozenset({0, os.geteuid()})


def describe(st: os.stat_result) -> str:
    """Returns "owner uid N, mode 0NNNN" of a file status, for messages."""
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _owners_text(owners: frozenset[int]) -> str:
    others = sorted(owners - {0})
    return "root" + "".join(f" or uid {u}" for u in others)


def unsafe_reason(st: os.stat_result, owners: frozenset[int]) -> str:
    """Returns why a file or directory of status ``st`` could be changed by someone not in
    ``owners`` ("" if it cannot): another owner, or a group/other write bit."""
    if st.st_uid not in owners:
        return f"is owned by uid {st.st_uid}, not {_owners_text(owners)} ({describe(st)})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others ({describe(st)})"
    return ""


def _components(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Yields (name, path so far) for each component of ``path`` made absolute."""
    full = os.path.abspath(os.fsdecode(path))
    so_far = ""
    for name in full.split("/"):
        if name:
            so_far += "/" + name
            yield name, so_far


def walk(
    path: str | os.PathLike[str],
    *,
    owners: frozenset[int] | None = None,
    create_mode: int | None = None,
    missing_ok: bool = False,
) -> int | None:
    """Returns a directory descriptor (:data:`DIR_FLAGS`) of ``path``, reached from ``/``
    one component at a time without following any link; the caller closes it.

    Raises UnsafePathError naming the first component that is a symbolic link or not a
    directory, and with ``owners`` also one that :func:`unsafe_reason` rejects (a
    root-owned sticky directory above the last component passes). A missing component
    raises FileNotFoundError, or is created with ``create_mode`` (set with ``fchmod``,
    whatever the umask), or with ``missing_ok`` makes the answer None.
    """
    fd = os.open("/", DIR_FLAGS)
    try:
        parts = list(_components(path))
        for i, (name, so_far) in enumerate(parts):
            try:
                nxt = open_subdir(
                    fd,
                    name,
                    so_far,
                    owners=owners,
                    create_mode=create_mode,
                    sticky_ok=i < len(parts) - 1,
                )
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise
            os.close(fd)
            fd = nxt
        out, fd = fd, -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def open_subdir(
    dirfd: int,
    name: str,
    shown: str,
    *,
    owners: frozenset[int] | None = None,
    create_mode: int | None = None,
    sticky_ok: bool = False,
) -> int:
    """Returns a directory descriptor of ``name`` in ``dirfd`` (``shown``: its path, for
    messages), opened without following a link; the caller closes it.

    Missing: FileNotFoundError, or created with ``create_mode`` (private until
    ``fchmod``, whatever the umask). With ``owners``, UnsafePathError unless
    :func:`unsafe_reason` accepts it (or, with ``sticky_ok``, it is a root-owned sticky
    directory). A link or a non-directory: UnsafePathError naming it.
    """
    created = False
    try:
        fd = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except FileNotFoundError:
        if create_mode is None:
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=dirfd)
            created = True
        except FileExistsError:
            pass  # made meanwhile: checked like any other below
        fd = _open_component(dirfd, name, shown)
    except OSError as err:
        fd = _refuse_component(dirfd, name, shown, err)
    try:
        if created and create_mode is not None:
            os.fchmod(fd, create_mode)
        st = os.fstat(fd)
        if owners is not None and not (sticky_ok and st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            why = unsafe_reason(st, owners)
            if why:
                raise UnsafePathError(shown, f"{shown} {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_component(dirfd: int, name: str, so_far: str) -> int:
    try:
        return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except OSError as err:
        return _refuse_component(dirfd, name, so_far, err)


def _refuse_component(dirfd: int, name: str, so_far: str, err: OSError) -> int:
    """Raises the error for a component that did not open as a directory: a symbolic
    link (named, with where it points) or something else; OSError as it is otherwise."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        raise err from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dirfd)
        raise UnsafePathError(
            so_far,
            f"{so_far} is a symbolic link (to {target}): not followed, since whoever can "
            f"change the link chooses the directory; name the real directory",
        ) from err
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(so_far, f"{so_far} is not a directory ({describe(st)})") from err
    raise err


def open_nofollow(dirfd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """Returns a descriptor of ``name`` in directory ``dirfd`` opened without following a
    link (ELOOP for one) and without blocking on a FIFO; the caller closes it."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)


TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # replace_file's, for sweep_temps


def sweep_temps(dirfd: int) -> list[str]:
    """Returns the names of :func:`replace_file` temporaries removed from ``dirfd``: left
    by a writer killed between naming its file and renaming it. The caller must hold
    what keeps other writers out (the store's lock), or it removes their files."""
    gone = []
    for name in os.listdir(dirfd):
        if TEMP_NAME.fullmatch(name):
            try:
                os.unlink(name, dir_fd=dirfd)
                gone.append(name)
            except FileNotFoundError:
                continue
    return gone


def replace_file(dirfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``name`` in directory ``dirfd`` atomically: a new file, synced,
    then renamed over ``name`` through the same descriptor. A reader sees the old file or
    all of the new one; a link planted at either name is replaced, never written through.

    The new file is anonymous while it is written (``O_TMPFILE``), given a random name
    (``linkat``) only once complete, then renamed: a writer killed at any instant leaves
    nothing, or, between those last two calls, a temporary that :func:`sweep_temps`
    recognises. Where ``O_TMPFILE`` is missing: ``O_CREAT | O_EXCL | O_NOFOLLOW``."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        anonymous = True
    except OSError:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dirfd)
        anonymous = False
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if anonymous:  # complete: now it may have a name
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dirfd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise
