"""Debian's libvirt daemon for tests, apart from the host's (docs/qemu.md, "Under
libvirt"). Named ``libvirtd``, not ``libvirt``: that is libvirt's own Python binding.

``Libvirtd(workdir)`` starts ``libvirtd`` as root in a mount namespace of its own:
``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt``
are private tmpfs, ``/etc/libvirt`` is ``workdir/etc``, the daemon's pid file is
``workdir/run/libvirtd.pid`` (not ``/run/libvirtd.pid``, which would let one daemon run
at a time), and clients connect through ``workdir/run/libvirt-sock`` (``uri``). Nothing
of a libvirt the host may run is read or written, and no init system is needed. The QEMU
driver runs QEMU as Debian's ``libvirt-qemu`` user (its default); the network namespace
is the host's, so an agent on its abstract address is reached from outside as usual.

The driver's settings (``workdir/etc/qemu.conf``) leave out what needs a host set up for
it: no security driver (no AppArmor or SELinux here), no cgroups, QEMU's output to a
file instead of virtlogd. libvirt's default per-domain mount namespace (a private
``/dev`` for each QEMU) stays.

``libvirtd.guest`` runs the test guest of ``scripts/guest`` as a domain of such a daemon
(docs/qemu.md, "A real guest under libvirt").
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["Libvirtd", "LibvirtError", "domain_xml", "libvirtd_missing"]

PRIVATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")

QEMU_CONF = """\
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
remember_owner = 0
"""


class LibvirtError(Exception):
    """A libvirt command failed (its output in the message)."""


def libvirtd_missing() -> str:
    """Returns why libvirtd cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "libvirtd's system instance needs root (it starts QEMU as libvirt-qemu)"
    for tool in ("/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/unshare"):
        if not os.access(tool, os.X_OK):
            return f"{tool}: not installed (scripts/bootstrap.sh installs libvirt)"
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return "no user libvirt-qemu (made by libvirt-daemon-system)"
    return ""


# A firmware the project's QEMU can boot: Debian's QEMU source package (dfsg) has no
# firmware blobs, so the build has no bios-256k.bin; qemu-system-data ships qboot.
FIRMWARE = Path("/usr/share/qemu/qboot.rom")


def domain_xml(
    name: str,
    emulator: Path | str,
    *,
    machine: str = "pc",
    memory_mib: int = 64,
    firmware: Path | None = FIRMWARE,
    env: dict[str, str] | None = None,
) -> str:
    """Returns the XML of a TCG domain (``type='qemu'``) without disk, network, USB,
    balloon or display: the emulator's process and its QMP monitor only. ``env`` is
    passed to QEMU with ``<qemu:env>`` (libvirt marks the domain ``custom-argv``)."""
    loader = f"<loader type='rom'>{firmware}</loader>" if firmware else ""
    extra = ""
    if env:
        lines = "".join(f"\n    <qemu:env name='{k}' value='{v}'/>" for k, v in env.items())
        extra = f"\n  <qemu:commandline>{lines}\n  </qemu:commandline>"
    return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type>{loader}</os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>{extra}
</domain>
"""


class Libvirtd:
    """A private libvirtd (module docstring), ``qemu_conf`` added to its qemu.conf;
    ``stop()`` ends it and every QEMU it started."""

    def __init__(self, workdir: Path, qemu_conf: str = "", cache: Path | None = None) -> None:
        self.workdir = workdir
        self.qemu_conf = qemu_conf  # more lines of qemu.conf
        # /var/cache/libvirt, kept across daemons: libvirt's probe of an emulator's
        # capabilities (tens of seconds for Debian's QEMU here) is done once; libvirt
        # probes again when the binary's ctime or libvirt's version changes.
        self.cache = cache
        self.run_dir = workdir / "run"
        self.etc = workdir / "etc"
        self.log = workdir / "libvirtd.log"
        self.uri = f"qemu:///system?socket={self.run_dir}/libvirt-sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        """Starts libvirtd and waits until ``virsh version`` answers."""
        for d in (self.run_dir, self.etc):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        (self.etc / "qemu.conf").write_text(QEMU_CONF + self.qemu_conf)
        conf = self.workdir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.run_dir}"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\nunix_sock_rw_perms = "0700"\n'
            f'log_outputs = "3:file:{self.log}"\n'
        )
        mounts = "; ".join(
            f"mkdir -p {d} && mount -t tmpfs -o mode=0755 tmpfs {d}" for d in PRIVATE_DIRS
        )
        if self.cache is not None:
            self.cache.mkdir(mode=0o755, parents=True, exist_ok=True)
            mounts += f"; mount --bind {self.cache} /var/cache/libvirt"
        script = (
            f"set -e; {mounts}; mount --bind {self.etc} /etc/libvirt; "
            f"exec /usr/sbin/libvirtd -f {conf} -p {self.run_dir}/libvirtd.pid"
        )
        # unshare execs sh, sh execs libvirtd: the Popen's pid is libvirtd's.
        with open(self.workdir / "libvirtd.out", "wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LibvirtError(
                    f"libvirtd exited {self.proc.returncode}: "
                    + (self.workdir / "libvirtd.out").read_text(errors="replace")[-2000:]
                )
            if (self.run_dir / "libvirt-sock").exists():
                try:
                    self.virsh("version")
                    return
                except LibvirtError:
                    pass
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer within {timeout} s")
            time.sleep(0.2)

    def virsh(self, *args: str, timeout: float = 120) -> str:
        """Returns the output of ``virsh -c URI ARGS``; LibvirtError if it fails."""
        proc = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def define_and_start(self, name: str, xml: str) -> int:
        """Returns the pid of domain ``name``'s QEMU, defined from ``xml`` and started."""
        path = self.workdir / f"{name}.xml"
        path.write_text(xml)
        self.virsh("define", str(path))
        self.virsh("start", name)
        return self.qemu_pid(name)

    def qemu_pid(self, name: str) -> int:
        """Returns the pid libvirt recorded for domain ``name``'s QEMU (its pidfile)."""
        assert self.proc is not None
        pidfile = Path(f"/proc/{self.proc.pid}/root/run/libvirt/qemu/{name}.pid")
        return int(pidfile.read_text().strip())

    def qemu_log_path(self, name: str) -> Path:
        """Returns the path, as seen from outside the daemon's mount namespace, of
        libvirt's log of domain ``name`` (QEMU's standard output and error)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root/var/log/libvirt/qemu/{name}.log")

    def qemu_log(self, name: str) -> str:
        """Returns QEMU's output for domain ``name`` (libvirt's log file of it)."""
        return self.qemu_log_path(name).read_text(errors="replace")

    def qmp(self, name: str, command: str) -> str:
        """Returns the JSON answer of QMP ``command`` (a JSON object) sent to domain
        ``name``'s QEMU through libvirt's monitor (``virsh qemu-monitor-command``)."""
        return self.virsh("qemu-monitor-command", name, command)

    def stop(self) -> None:
        """Destroys every running domain, ends libvirtd, then kills what is left of it: a
        QEMU libvirt recorded but did not stop, any process of its mount namespace."""
        if self.proc is None:
            return
        try:
            for name in self.virsh("list", "--name", timeout=30).split():
                try:
                    self.virsh("destroy", name, timeout=30)
                except LibvirtError:
                    pass
        except (LibvirtError, subprocess.TimeoutExpired):
            pass
        # (pid, its start time): a pid reused meanwhile is not killed.
        left: set[tuple[int, str]] = set()
        ns = _mount_ns(self.proc.pid)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and ns and _mount_ns(int(entry)) == ns:
                left.add((int(entry), _start_time(int(entry))))
        for f in Path(f"/proc/{self.proc.pid}/root/run/libvirt/qemu").glob("*.pid"):
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            left.add((pid, _start_time(pid)))
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid, started in left:
            if started and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc = None


def _mount_ns(pid: int) -> str:
    """Returns the mount namespace of ``pid`` ("mnt:[N]"), "" if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """Returns field 22 of /proc/PID/stat (start time in ticks), "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
