"""What /proc says about a process: its status fields, threads, where each thread is,
its memory map, the ELF objects it maps (by GNU build-id, cached per file) and whether
the kernel protects it from same-uid tracing (:func:`privileged_reason`)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from patchbox.elf.buildid import read_build_id
from patchbox.elf.records import EHDR, PHDR
from patchbox.errors import ElfError

__all__ = [
    "Mapping",
    "MappedObject",
    "read_status",
    "read_maps",
    "task_ids",
    "task_syscall",
    "task_comm",
    "mapped_objects",
    "find_mapped",
    "file_build_id",
    "AT_SECURE",
    "privileged_reason",
]

PT_LOAD = 1


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str


@dataclass(frozen=True)
class MappedObject:
    """An ELF file mapped by a process: its path (in the process's view), load bias and
    GNU build-id (hex, "" if none)."""

    path: str
    bias: int
    build_id: str


def read_status(pid: int) -> dict[str, str]:
    """Returns the fields of /proc/PID/status ({} if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _s, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def read_maps(pid: int) -> list[Mapping]:
    """Returns the mappings of process ``pid`` (raises OSError if unreadable)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            out.append(Mapping(lo, hi, parts[1], int(parts[2], 16), int(parts[4]), path))
    return out


def task_ids(pid: int) -> list[int]:
    """Returns the thread ids of process ``pid`` ([] if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except OSError:
        return []


def task_syscall(pid: int, tid: int) -> tuple[int, int, int] | None:
    """Returns (system call number or -1, sp, pc) of a thread that is not running, None
    for one that runs (or is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] == "running" or len(fields) < 3:
        return None
    return int(fields[0]), int(fields[-2], 16), int(fields[-1], 16)


def task_comm(pid: int, tid: int) -> str:
    """Returns the name of thread ``tid`` ("" if gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


_FILES: dict[tuple[int, int, int, int], tuple[str, int]] = {}  # file identity -> (bid, vaddr)


def _file_facts(path: str) -> tuple[str, int]:
    """Returns (build-id hex, page-aligned p_vaddr of the PT_LOAD at file offset 0) of the
    ELF file ``path``, cached by its identity; ("", 0) for what is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return "", 0
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        bid, vaddr = "", 0
        try:
            found = read_build_id(path)
            bid = found.hex() if found else ""
            with open(path, "rb") as f:
                head = f.read(EHDR.size)
                eh = dict(zip(EHDR.fields, EHDR.unpack_from(head, 0, path), strict=True))
                f.seek(eh["e_phoff"])
                table = f.read(PHDR.size * eh["e_phnum"])
            for ph in PHDR.iter_table(table, 0, len(table), path):
                if ph[0] == PT_LOAD and ph[2] == 0:
                    vaddr = ph[3] & ~0xFFF
                    break
        except (ElfError, OSError, ValueError, KeyError):
            pass
        if len(_FILES) > 4096:
            _FILES.clear()
        _FILES[key] = (bid, vaddr)
    return _FILES[key]


def file_build_id(path: str) -> str:
    """Returns the GNU build-id (hex) of the ELF file ``path``, "" for what is not one or
    has none; read once per file identity and mtime."""
    return _file_facts(path)[0]


def mapped_objects(pid: int) -> list[MappedObject]:
    """Returns the ELF files process ``pid`` maps from file offset 0 (its executable, its
    libraries), each once, read through /proc/PID/root (the process's mount namespace).
    [] when its map cannot be read."""
    try:
        maps = read_maps(pid)
    except OSError:
        return []
    out: list[MappedObject] = []
    seen: set[str] = set()
    for m in maps:
        if m.offset != 0 or not m.path.startswith("/") or m.path in seen or not m.inode:
            continue
        seen.add(m.path)
        bid, vaddr = _file_facts(f"/proc/{pid}/root{m.path.removesuffix(' (deleted)')}")
        if bid:
            out.append(MappedObject(m.path, m.start - vaddr, bid))
    return out


def find_mapped(pid: int, build_id: str) -> MappedObject | None:
    """Returns the object of build-id ``build_id`` (hex) that ``pid`` maps, or None."""
    return next((o for o in mapped_objects(pid) if o.build_id == build_id.lower()), None)


AT_SECURE = 23  # <elf.h>: non-zero when the process was started with raised privileges
_AUXV_ENTRY = struct.Struct("<QQ")  # (a_type, a_val) on x86-64 and aarch64


def _auxv_secure(pid: int) -> int:
    """Returns AT_SECURE of process ``pid``'s auxiliary vector (0 if absent); raises
    OSError if /proc/PID/auxv cannot be read."""
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    for a_type, a_val in _AUXV_ENTRY.iter_unpack(data[: len(data) // 16 * 16]):
        if a_type == AT_SECURE:
            return a_val
        if a_type == 0:  # AT_NULL
            break
    return 0


def privileged_reason(pid: int) -> str:
    """Returns why the kernel keeps a same-uid tracer away from process ``pid`` ("" if it
    does not): each reason found, "; "-separated.

    The kernel's ptrace rule (``__ptrace_may_access`` in kernel/ptrace.c and
    ``cap_ptrace_access_check`` in security/commoncap.c): a tracer without
    ``CAP_SYS_PTRACE`` must have the target's real, effective and saved uid and gid, the
    target must be dumpable (``get_dumpable(mm) == SUID_DUMP_USER``), and the target's
    permitted capabilities must be a subset of the tracer's. Loading the agent into a
    process that rule protects would let whoever reaches its socket do what the kernel
    forbids them, so `attach` skips such a process unless told otherwise. Seen from
    outside:

    - AT_SECURE in ``/proc/PID/auxv``: started setuid, setgid or with file capabilities;
    - ``Uid:``/``Gid:`` of ``/proc/PID/status`` whose real, effective, saved and fs ids
      differ (a setuid or setgid program, or one that changed credentials);
    - ``CapPrm``/``CapEff`` non-zero though the effective uid is not 0 (file or ambient
      capabilities);
    - not dumpable (``PR_SET_DUMPABLE 0``, or dropped to it by a credential change): the
      kernel makes the files under ``/proc/PID`` of a non-dumpable process owned by
      root, or the root of its user namespace (``task_dump_owner`` in fs/proc/base.c;
      ``/proc/PID`` itself keeps the effective uid), so ``/proc/PID/status`` owned by
      another uid than the process's effective uid means it is not dumpable.

    What cannot be read counts as a reason (fail closed): a process whose privileges
    cannot be checked is not attached to.
    """
    why: list[str] = []
    try:
        with open(f"/proc/{pid}/status") as f:
            owner = os.fstat(f.fileno()).st_uid
            fields = {k: v.strip() for k, _s, v in (line.partition(":") for line in f)}
    except OSError as err:
        return f"/proc/{pid}/status cannot be read ({err.strerror}): privileges unknown"
    try:
        uids = [int(v) for v in fields["Uid"].split()]
        gids = [int(v) for v in fields["Gid"].split()]
        cap_prm = int(fields.get("CapPrm", "0"), 16)
        cap_eff = int(fields.get("CapEff", "0"), 16)
    except (KeyError, ValueError):
        return f"/proc/{pid}/status has no usable Uid:/Gid: lines: privileges unknown"
    euid = uids[1]
    try:
        if _auxv_secure(pid):
            why.append("started setuid, setgid or with file capabilities (AT_SECURE)")
    except OSError as err:
        why.append(f"/proc/{pid}/auxv cannot be read ({err.strerror})")
    if len(set(uids)) > 1:
        why.append("uids differ (real, effective, saved, fs: " + " ".join(map(str, uids)) + ")")
    if len(set(gids)) > 1:
        why.append("gids differ (real, effective, saved, fs: " + " ".join(map(str, gids)) + ")")
    if euid != 0 and (cap_prm or cap_eff):
        why.append(f"has capabilities as uid {euid} (CapPrm {cap_prm:x}, CapEff {cap_eff:x})")
    if euid != 0 and owner != euid:
        why.append(f"not dumpable (/proc/{pid}/status is owned by uid {owner}, not its uid {euid})")
    return "; ".join(why)
