"""What /proc says about processes: patchbox's one reader of /proc.

Every fact patchbox takes from /proc is read here, and every path into a process's view
(``/proc/PID/root``, ``/proc/PID/fd/N``) is spelled here: a process's status, threads,
memory map, executable and command line (with the VM name a QEMU's carries,
:func:`vm_name`); the ELF objects it maps (by GNU build-id, read through its
mount namespace and cached per file); the Unix sockets of its network namespace
(``/proc/PID/net/unix``) and which of them it holds (``/proc/PID/fd``); its namespaces;
and whether the kernel protects it from same-uid tracing (:func:`privileged_reason`).

What it does not decide (docs/security.md): a pid is only a name here, and pids are
reused, so nothing read here admits a peer. A connection is used only when its
``SO_PEERCRED`` is the pid it was looked up for (:mod:`patchbox.protocol.client`,
:mod:`patchbox.host.batch`); the stale-socket sweep looks the pid up again just before a
removal (:mod:`patchbox.protocol.discovery`); what cannot be read makes a process count
as privileged (:func:`privileged_reason` fails closed). Directories are still opened
through :mod:`patchbox.safefs`, and a process's memory is the tracer's
(``/proc/PID/mem``, :mod:`patchbox.reach.ptrace`).

Start-up: this module imports nothing heavier than :mod:`struct` (records are named
tuples, no dataclasses or pathlib); the ELF readers load
only when a mapped file's build-id is read (the client's discovery imports this module).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from patchbox.errors import ElfError

__all__ = [
    "age_seconds",
    "root_path",
    "fd_path",
    "cwd_path",
    "process_ids",
    "exists",
    "read_status",
    "get_ns_pid",
    "process_state",
    "exe_link",
    "exe_path",
    "stat_exe",
    "open_exe",
    "exe_build_id",
    "task_ids",
    "task_status",
    "task_syscall",
    "task_comm",
    "CMDLINE_MAX",
    "read_cmdline",
    "split_cmdline",
    "is_qemu",
    "iter_qemu_opts",
    "qemu_guest_name",
    "vm_name",
    "Mapping",
    "MappedObject",
    "read_maps",
    "mapped_objects",
    "find_mapped",
    "file_build_id",
    "SO_ACCEPTCON",
    "SOCK_STREAM_TYPE",
    "UnixSocket",
    "parse_proc_net_unix",
    "iter_unix_sockets",
    "get_socket_inodes",
    "holds_socket",
    "socket_owners",
    "fd_target",
    "namespace",
    "root_usable",
    "YAMA_SCOPE",
    "ptrace_scope",
    "AT_SECURE",
    "privileged_reason",
]

_CACHE_MAX = 65536  # files remembered by identity at most (then forgotten at once)
_FILES_MAX = 4096  # mapped files whose build-id is remembered at most (likewise)
# Columns of /proc/PID/maps before the path (address perms offset dev inode), of
# /proc/net/unix before the path (Num RefCount Protocol Flags Type St Inode); the least
# /proc/PID/task/TID/syscall holds of a blocked thread (number, then sp and pc last).
_MAPS_COLUMNS, _UNIX_COLUMNS, _SYSCALL_MIN_FIELDS = 5, 7, 3


# -- paths into a process's view --------------------------------------------------------


def root_path(pid: int, path: str) -> str:
    """Returns ``path`` (absolute, as process ``pid`` names it) seen through its root:
    its mount namespace and chroot."""
    return f"/proc/{pid}/root{path}"


def fd_path(pid: int | str, fd: int | str) -> str:
    """Returns the path of descriptor ``fd`` of process ``pid`` (a link to what it holds)."""
    return f"/proc/{pid}/fd/{fd}"


def cwd_path(pid: int, path: str) -> str:
    """Returns the relative ``path`` of process ``pid`` seen through its working directory."""
    return f"/proc/{pid}/cwd/{path}"


# -- processes ----------------------------------------------------------------------


# starttime's index among /proc/PID/stat's fields after "(comm)": field 22, the state 3rd.
_STAT_STARTTIME = 19


def process_ids() -> list[int]:
    """Returns the pids of this pid namespace (one read of /proc)."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def exists(pid: int) -> bool:
    """Returns True if /proc lists process ``pid`` (a zombie too)."""
    return os.path.exists(f"/proc/{pid}")


def read_status(pid: int) -> dict[str, str]:
    """Returns the fields of /proc/PID/status ({} if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _s, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def get_ns_pid(pid: int) -> int:
    """Returns pid as the process itself sees it (the last NSpid of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return pid


def age_seconds(pid: int) -> float | None:
    """Returns how long ago process ``pid`` started (its /proc/PID/stat start time against
    the system's uptime), None if that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    started = int(fields[_STAT_STARTTIME]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, uptime - started)


def process_state(pid: int) -> str | None:
    """Returns the state letter of /proc/PID/stat (``R``, ``S``, ``Z`` a zombie, ``X``
    dead...), None if it cannot be read (gone, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :][:1]  # the name in parentheses may hold anything


def exe_link(pid: int) -> str:
    """Returns the path of ``pid``'s executable as /proc names it (`` (deleted)`` kept);
    raises OSError (FileNotFoundError: no such process)."""
    return os.readlink(f"/proc/{pid}/exe")


def exe_path(pid: int) -> str:
    """Returns the path of ``pid``'s executable as /proc names it (" (deleted)" dropped for
    a file replaced since it started), "" when it cannot be read."""
    try:
        return exe_link(pid).removesuffix(" (deleted)")
    except OSError:
        return ""


def stat_exe(pid: int) -> os.stat_result:
    """Returns the stat of ``pid``'s executable (the file it runs, even if replaced on
    disk); raises OSError."""
    return os.stat(f"/proc/{pid}/exe")


def open_exe(pid: int) -> BinaryIO:
    """Returns ``pid``'s executable opened for reading (the file it runs, even if replaced
    on disk); raises OSError."""
    return open(f"/proc/{pid}/exe", "rb")


# (st_dev, st_ino, st_mtime_ns) of an executable -> its build-id ("" when none).
_EXE_IDS: dict[tuple[int, int, int], str] = {}


def exe_build_id(pid: int, st: os.stat_result) -> str:
    """Returns the build-id (hex, "" when none) of ``pid``'s executable whose stat is
    ``st`` (:func:`stat_exe`), read once per file identity and mtime."""
    from patchbox.elf.buildid import read_build_id  # only when a file is read: start-up

    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    found = _EXE_IDS.get(key)
    if found is None:
        try:
            bid = read_build_id(f"/proc/{pid}/exe")
        except ElfError:
            bid = None
        found = bid.hex() if bid else ""
        if len(_EXE_IDS) >= _CACHE_MAX:
            _EXE_IDS.clear()
        _EXE_IDS[key] = found
    return found


# -- threads ------------------------------------------------------------------------


def task_ids(pid: int) -> list[int]:
    """Returns the thread ids of process ``pid`` ([] if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except OSError:
        return []


def task_status(pid: int, tid: int) -> dict[str, str]:
    """Returns the fields of /proc/PID/task/TID/status ({} if the thread is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            return {k: v.strip() for k, _s, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def task_syscall(pid: int, tid: int) -> tuple[int, int, int] | None:
    """Returns (system call number or -1, sp, pc) of a thread that is not running, None
    for one that runs (or is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] == "running" or len(fields) < _SYSCALL_MIN_FIELDS:
        return None
    return int(fields[0]), int(fields[-2], 16), int(fields[-1], 16)


def task_comm(pid: int, tid: int) -> str:
    """Returns the name of thread ``tid`` ("" if gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# -- command line and QEMU's VM name --------------------------------------------------

CMDLINE_MAX = 1 << 20  # bytes of /proc/PID/cmdline read at most (libvirt's QEMU: ~10 KiB)


def split_cmdline(data: bytes, complete: bool = True) -> list[bytes]:
    """Returns the arguments in the bytes of a /proc/PID/cmdline file: NUL-separated, the
    last one ended by a NUL (or not: a process title rewritten in place). With
    ``complete`` false the bytes were cut short, and the piece after the last NUL, part
    of an argument, is left out."""
    args = data.split(b"\0")
    last = args.pop()  # b"" after the final NUL
    if last and complete:
        args.append(last)
    return args


def read_cmdline(pid: int, limit: int = CMDLINE_MAX) -> list[bytes]:
    """Returns the arguments of process ``pid`` from /proc/PID/cmdline, of its first
    ``limit`` bytes (an argument cut there is left out); [] when it cannot be read (gone,
    a kernel thread, ``hidepid``). They are what the process's memory holds now: a
    process may rewrite them (a title), so they name, they do not prove."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return []
    return split_cmdline(data[:limit], complete=len(data) <= limit)


def is_qemu(exe: str) -> bool:
    """Returns whether the program at path ``exe`` is QEMU's system emulator, by its file
    name: ``qemu-system-ARCH`` (Debian, libvirt's emulator), ``qemu-kvm`` (Red Hat's) or
    ``kvm``."""
    name = exe.rsplit("/", 1)[-1]
    return name.startswith("qemu-system-") or name in ("qemu-kvm", "kvm")


def _opt_value(params: bytes, start: int) -> tuple[bytes, int]:
    """Returns (the value starting at ``start`` with each ``,,`` made ``,``, the index of
    the ``,`` that ends it or ``len(params)``): QEMU's ``get_opt_value``."""
    parts: list[bytes] = []
    p = start
    while True:
        comma = params.find(b",", p)
        if comma < 0:
            parts.append(params[p:])
            return b"".join(parts), len(params)
        if params[comma + 1 : comma + 2] != b",":
            parts.append(params[p:comma])
            return b"".join(parts), comma
        parts.append(params[p : comma + 1])  # ",," is one comma of the value
        p = comma + 2


def iter_qemu_opts(params: bytes, implied: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
    """Yields the (key, value) pairs of one QEMU option argument, in order, as QemuOpts
    reads it (``opts_do_parse`` in util/qemu-option.c): ``key=value`` elements separated
    by ``,``, a ``,,`` inside a value standing for one comma; the first element without
    ``=`` is the value of the ``implied`` key (``-name NAME,...``: ``guest``); any other
    element without ``=`` is a flag, ``KEY`` meaning ``KEY=on`` and ``noKEY`` ``KEY=off``.
    Linear in the length of ``params``."""
    first = implied
    p, n = 0, len(params)
    while p < n:
        comma = params.find(b",", p)
        end = n if comma < 0 else comma
        eq = params.find(b"=", p, end)  # strcspn(p, "=,"): only up to the next comma
        if eq >= 0:
            key = params[p:eq]
            value, p = _opt_value(params, eq + 1)
        elif first is not None:
            key = first
            value, p = _opt_value(params, p)
        else:
            key, p = params[p:end], end
            key, value = (key[2:], b"off") if key.startswith(b"no") else (key, b"on")
        first = None
        yield key, value
        p += 1  # the "," ending the element (past the end when it was the last)


def qemu_guest_name(argv: list[bytes]) -> bytes | None:
    """Returns the guest name QEMU's arguments ``argv`` (``argv[0]`` the program) set with
    ``-name`` (or ``--name``): ``NAME``, ``guest=NAME,debug-threads=on`` (libvirt's form),
    ``NAME,process=...``, commas in it doubled; None when none is set. QEMU merges its
    ``-name`` options, and the last ``guest`` wins. An argument of another option that
    is literally ``-name`` is taken for the option (QEMU's table of which options take
    an argument is not known here)."""
    name = None
    i = 1
    while i < len(argv) - 1:
        if argv[i] in (b"-name", b"--name"):
            for key, value in iter_qemu_opts(argv[i + 1], b"guest"):
                if key == b"guest":
                    name = value
            i += 2
        else:
            i += 1
    return name


def vm_name(pid: int, exe: str) -> str:
    """Returns the VM name of process ``pid`` whose executable is ``exe`` (its path, ""
    when unknown: then ``argv[0]`` is looked at): the guest name of its ``-name`` when it
    is QEMU (:func:`is_qemu`), "" otherwise or when it has none. Bytes that are not UTF-8
    come out as ``\\xNN``. /proc/PID/cmdline is read only for a QEMU."""
    if exe and not is_qemu(exe):
        return ""
    argv = read_cmdline(pid)
    if not argv or not is_qemu(exe or argv[0].decode("utf-8", "replace")):
        return ""
    name = qemu_guest_name(argv)
    return name.decode("utf-8", "backslashreplace") if name is not None else ""


# -- memory map and mapped objects ----------------------------------------------------


class Mapping(NamedTuple):
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    dev: str = ""  # major:minor (hex) of the file's device, as the line gives it


class MappedObject(NamedTuple):
    """An ELF file mapped by a process: its path (in the process's view), load bias and
    GNU build-id (hex, "" if none)."""

    path: str
    bias: int
    build_id: str


def read_maps(pid: int) -> list[Mapping]:
    """Returns the mappings of process ``pid`` (raises OSError if unreadable)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, _MAPS_COLUMNS)
            if len(parts) < _MAPS_COLUMNS:
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            path = parts[_MAPS_COLUMNS].rstrip("\n") if len(parts) > _MAPS_COLUMNS else ""
            out.append(Mapping(lo, hi, parts[1], int(parts[2], 16), int(parts[4]), path, parts[3]))
    return out


_FILES: dict[tuple[int, int, int, int], tuple[str, int]] = {}  # file identity -> (bid, vaddr)


def _file_facts(path: str) -> tuple[str, int]:
    """Returns (build-id hex, page-aligned p_vaddr of the PT_LOAD at file offset 0) of the
    ELF file ``path``, cached by its identity; ("", 0) for what is not one."""
    from patchbox.elf.buildid import build_id_of  # only when a file is read: start-up
    from patchbox.elf.segments import first_load_vaddr, read_program_headers

    try:
        st = os.stat(path)
    except OSError:
        return "", 0
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        bid, vaddr = "", 0
        try:
            with open(path, "rb") as f:
                phdrs = read_program_headers(f, path)
                found = build_id_of(f, phdrs, path)
            bid = found.hex() if found else ""
            vaddr = first_load_vaddr(phdrs)
        except (ElfError, OSError):
            pass
        if len(_FILES) > _FILES_MAX:
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
        bid, vaddr = _file_facts(root_path(pid, m.path.removesuffix(" (deleted)")))
        if bid:
            out.append(MappedObject(m.path, m.start - vaddr, bid))
    return out


def find_mapped(pid: int, build_id: str) -> MappedObject | None:
    """Returns the object of build-id ``build_id`` (hex) that ``pid`` maps, or None."""
    return next((o for o in mapped_objects(pid) if o.build_id == build_id.lower()), None)


# -- Unix sockets and namespaces ------------------------------------------------------

# /proc/net/unix: the socket is listening (__SO_ACCEPTCON in Flags); Type 1 is a stream.
SO_ACCEPTCON = 0x10000
SOCK_STREAM_TYPE = 1


class UnixSocket(NamedTuple):
    """One line of /proc/net/unix: a Unix socket of the network namespace."""

    inode: int
    flags: int
    type: int
    state: int
    path: str  # as bound ("" unnamed, "@..." abstract)

    @property
    def listening(self) -> bool:
        """Returns True for a socket that accepts connections."""
        return bool(self.flags & SO_ACCEPTCON)


def parse_proc_net_unix(text: str) -> list[UnixSocket]:
    """Returns the sockets listed in the text of a /proc/net/unix file.

    Columns: ``Num RefCount Protocol Flags Type St Inode [Path]`` (hex except Inode);
    the path is the rest of the line, spaces included. Lines that do not parse are
    skipped (the header among them).
    """
    out: list[UnixSocket] = []
    for line in text.splitlines():
        parts = line.split(None, _UNIX_COLUMNS)
        if len(parts) < _UNIX_COLUMNS or not parts[0].endswith(":"):
            continue
        try:
            flags, kind, state = (int(v, 16) for v in parts[3:6])
            inode = int(parts[6])
        except ValueError:
            continue
        path = parts[_UNIX_COLUMNS] if len(parts) > _UNIX_COLUMNS else ""
        out.append(UnixSocket(inode, flags, kind, state, path))
    return out


def iter_unix_sockets(pid: int | str) -> Iterator[UnixSocket]:
    """Yields the Unix sockets of pid's network namespace (/proc/PID/net/unix; ``"self"``
    for this process's); raises OSError when the table cannot be read."""
    with open(f"/proc/{pid}/net/unix", encoding="utf-8", errors="surrogateescape") as f:
        yield from parse_proc_net_unix(f.read())


def get_socket_inodes(pid: int) -> set[int]:
    """Returns the inodes of the sockets pid holds open (/proc/PID/fd/* -> socket:[N]);
    raises OSError when its descriptors cannot be listed."""
    out: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(fd_path(pid, fd))
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:[") and link.endswith("]"):
            out.add(int(link[8:-1]))
    return out


def holds_socket(pid: int, inode: int) -> bool:
    """Returns whether process ``pid`` holds socket ``inode`` open (False when its
    descriptors cannot be read)."""
    try:
        return inode in get_socket_inodes(pid)
    except OSError:
        return False


def socket_owners(inodes: Iterable[int], pids: Iterable[int] | None = None) -> dict[int, int]:
    """Returns {socket inode: pid} for ``inodes``, from every readable ``/proc/*/fd`` (of
    ``pids``, all by default): the first process holding each."""
    want = set(inodes)
    owners: dict[int, int] = {}
    for pid in process_ids() if pids is None else pids:
        try:
            held = get_socket_inodes(pid)
        except OSError:
            continue
        for inode in held & want:
            owners.setdefault(inode, pid)
    return owners


def fd_target(pid: int, fd: int | str) -> str:
    """Returns what descriptor ``fd`` of process ``pid`` refers to (a path, or
    ``socket:[N]``...); raises OSError."""
    return os.readlink(fd_path(pid, fd))


def namespace(pid: int | str, kind: str) -> int | None:
    """Returns the inode of process ``pid``'s namespace ``kind`` (``net``, ``pid``,
    ``mnt``; ``pid`` ``"self"``: this process's), None if it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def root_usable(pid: int) -> bool:
    """Returns True if paths may be resolved through /proc/PID/root (needs the same
    rights over the process as /proc/PID/fd)."""
    try:
        os.stat(f"/proc/{pid}/root/")
    except OSError:
        return False
    return True


# -- privileges ---------------------------------------------------------------------

YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


def ptrace_scope() -> int:
    """Returns Yama's ``ptrace_scope`` (0 without Yama)."""
    try:
        with open(YAMA_SCOPE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0  # no Yama


AT_SECURE = 23  # <elf.h>: non-zero when the process was started with raised privileges
_AUXV_ENTRY = struct.Struct("<QQ")  # (a_type, a_val) on every 64-bit little-endian Linux


def _auxv_secure(pid: int) -> int:
    """Returns AT_SECURE of process ``pid``'s auxiliary vector (0 if absent); raises
    OSError if /proc/PID/auxv cannot be read."""
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    for a_type, a_val in _AUXV_ENTRY.iter_unpack(data[: len(data) // 16 * 16]):
        if a_type == AT_SECURE:
            return int(a_val)
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
    if euid not in (0, owner):
        why.append(f"not dumpable (/proc/{pid}/status is owned by uid {owner}, not its uid {euid})")
    return "; ".join(why)
