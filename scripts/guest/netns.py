"""The guest's network: a namespace of its own holding a tap device and the UDP peer.

The namespace has only ``lo`` and the tap (host side ``HOST_ADDR``, guest ``GUEST_ADDR``):
the guest's packets reach the peer and nothing else, and nothing outside reaches them.
QEMU itself stays in the host's namespace (patchbox finds its agent socket there, through
``/proc/net/unix``): it gets the tap as an open file descriptor (``-netdev tap,fd=N``),
opened from a thread that entered the namespace. The peer's socket is made the same way
and served from an ordinary thread.

The tap is multiqueue so that a second QEMU (the destination of a live migration on this
host) can be given a queue of its own: opened detached (no packet reaches it, so the
destination's tap backend, which reads the tap even while its VM is not running, takes
none of the running guest's packets), and handed the guest's traffic when the source has
stopped (:meth:`Namespace.hand_over`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = [
    "GUEST_ADDR",
    "HOST_ADDR",
    "PEER_PORT",
    "PREFIX",
    "STOP_MAGIC",
    "Namespace",
    "Peer",
    "PeerCounts",
    "remove_stale",
    "set_queue",
]

HOST_ADDR = "10.78.0.1"
GUEST_ADDR = "10.78.0.2"
PREFIX = 24
PEER_PORT = 7777
TAP = "pbgtap0"
# pbguest.c: a datagram starting with this ends the guest's loop.
STOP_MAGIC = b"PBGSTOP!"
NET_MAGIC = b"PBGNET01"

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
SO_NO_CHECK = 11  # <asm-generic/socket.h>

T = TypeVar("T")


def _ip(*args: str) -> None:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def remove_stale(prefix: str) -> list[str]:
    """Deletes the namespaces ``PREFIX-PID-N`` whose process ``PID`` is gone (a run killed
    before it could clean up); returns their names."""
    proc = subprocess.run(
        ["ip", "netns", "list"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    gone = []
    for line in proc.stdout.splitlines():
        m = re.fullmatch(rf"({re.escape(prefix)}-(\d+)-\d+)(?: \(id: \d+\))?", line.strip())
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            subprocess.run(["ip", "netns", "del", m.group(1)], capture_output=True, check=False)
            gone.append(m.group(1))
    return gone


def set_queue(fd: int, *, attached: bool) -> None:
    """Attaches tap queue ``fd`` (packets may be steered to it) or detaches it (none
    are; the frames waiting in it are dropped)."""
    flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", flag))


class Namespace:
    """A network namespace ``name`` with lo up and a tap ``TAP`` at ``HOST_ADDR``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        self._packets: socket.socket | None = None
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "tuntap", "add", "dev", TAP, "mode", "tap", "multi_queue")
            _ip("-n", name, "addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", TAP)
            _ip("-n", name, "link", "set", TAP, "up")
        except BaseException:
            self.delete()
            raise

    def run_inside(self, fn: Callable[[], T]) -> T:
        """Returns ``fn()`` called on a thread that entered the namespace (file descriptors
        and sockets it opens stay bound to the namespace)."""
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.path}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as e:  # handed to the caller
                error.append(e)

        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def open_tap(self, *, attached: bool = True) -> int:
        """Returns a file descriptor of a new queue of the tap (no packet information
        header), for ``-netdev tap,fd=N``; ``attached=False``: detached at once (it
        receives nothing until :meth:`set_queue` attaches it). The caller closes it."""

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", TAP.encode(), flags))
                if not attached:
                    set_queue(fd, attached=False)
            except BaseException:
                os.close(fd)
                raise
            return fd

        return self.run_inside(attach)

    def hand_over(self, old: int, new: int, peer: Peer | None = None) -> int:
        """Moves the guest's incoming traffic from tap queue ``old`` to queue ``new``;
        returns the number of frames that were waiting in ``old`` (sent again through
        the tap, so they reach ``new``, in their order).

        Meant for the moment the reader of ``old`` has stopped reading it for good and
        the reader of ``new`` has not started. The peer's answers wait meanwhile (none
        can land in ``old`` after it was read out); ``old`` is read out before it is
        detached, which would drop what waits in it.
        """
        packets = self.packet_socket()
        with peer.held() if peer is not None else contextlib.nullcontext():
            os.set_blocking(old, False)  # the file's flag: its QEMU has set it already
            frames = []
            while True:
                try:
                    frames.append(os.read(old, 65536))
                except BlockingIOError:
                    break
            set_queue(new, attached=True)
            set_queue(old, attached=False)
            for frame in frames:
                packets.send(frame)
        return len(frames)

    def packet_socket(self) -> socket.socket:
        """Returns a raw packet socket on the tap (made on first use): what it sends
        leaves through the tap, that is, is queued for the tap's reader; it receives
        nothing (protocol 0)."""
        if self._packets is None:

            def make() -> socket.socket:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                s.bind((TAP, 0))
                return s

            self._packets = self.run_inside(make)
        return self._packets

    def udp_socket(self, address: str, port: int) -> socket.socket:
        """Returns a UDP socket of the namespace bound to ``address:port``."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((address, port))
            return s

        return self.run_inside(make)

    def delete(self) -> None:
        """Deletes the namespace (its tap goes with it once no process holds it)."""
        if self._packets is not None:
            self._packets.close()
            self._packets = None
        subprocess.run(
            ["ip", "netns", "del", self.name],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )


@dataclass
class PeerCounts:
    """What the peer saw: datagrams received and echoed, and faults it injected."""

    received: int = 0
    echoed: int = 0
    dropped: int = 0
    corrupted: int = 0
    bad: int = 0  # datagrams that were not the guest's
    last_seq: int = -1
    stop_sent: bool = False


@dataclass
class _Faults:
    drop: int = 0
    corrupt: int = 0
    stop: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Peer:
    """The host's side of the guest's packet exchange: echoes each datagram back as it came,
    except those it is told to drop or corrupt; answers with STOP once asked to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        # Echoes go without a UDP checksum (0: none, allowed over IPv4; the guest checks
        # every payload's CRC-32 itself). A QEMU starting on the tap, the destination of
        # a migration, probes its offloads (net/tap.c, tap_probe_has_ufo: checksum
        # offload on, then off again): while it is on, a tap without a virtio-net header
        # hands out the frames the kernel sends with their checksum not filled in, and
        # the guest would drop such an echo as corrupt.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        self.counts = PeerCounts()
        self._faults = _Faults()
        self._closing = threading.Event()
        self._sending = threading.Lock()  # held around each answer; see held()
        # The guest's sequence number of each echo -> time.monotonic() it was sent.
        self.echo_times: dict[int, float] = {}
        self._thread = threading.Thread(target=self._serve, name="guest-peer", daemon=True)
        self._thread.start()

    def drop_next(self, n: int) -> None:
        """Drops the next ``n`` datagrams (the guest must count them lost)."""
        with self._faults.lock:
            self._faults.drop += n

    def corrupt_next(self, n: int) -> None:
        """Echoes the next ``n`` datagrams with one payload byte flipped (the guest must
        count them corrupt)."""
        with self._faults.lock:
            self._faults.corrupt += n

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds the peer's answers for the duration of the ``with`` block: once in it,
        no answer is being sent and none will be until it ends (they wait, none is
        dropped)."""
        with self._sending:
            yield

    def request_stop(self) -> None:
        """Answers the guest's next datagram with STOP: its loop ends and it powers off."""
        with self._faults.lock:
            self._faults.stop = True

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            c = self.counts
            c.received += 1
            if len(data) < 24 or data[:8] != NET_MAGIC:
                c.bad += 1
                continue
            c.last_seq = int.from_bytes(data[8:16], "little")
            with self._faults.lock:
                stop = self._faults.stop
                if stop:
                    data = STOP_MAGIC
                    c.stop_sent = True
                elif self._faults.drop:
                    self._faults.drop -= 1
                    c.dropped += 1
                    continue
                elif self._faults.corrupt and len(data) > 24:
                    self._faults.corrupt -= 1
                    c.corrupted += 1
                    mid = 24 + (len(data) - 24) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1 :]
            with self._sending:
                self.sock.sendto(data, addr)
                sent = time.monotonic()
            if not stop:
                c.echoed += 1
                self.echo_times[c.last_seq] = sent

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()
