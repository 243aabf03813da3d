"""Many agents at once, from one process: one selector loop over non-blocking sockets.

`apply --all` on a host with thousands of processes must not start a Python process (or
a thread) per target: each job here is one connection to one agent carrying a short
list of requests (APPLY; INFO then LIST for `ps`), all driven by one epoll loop. The
agents work in parallel; this side only frames, sends and decodes.

A job fails *retryably* (``retry``) when the agent is busy: its listen backlog is full
(connect says EAGAIN until the deadline) or it does not answer in time. Other failures
(refusals, a process that exited) are not worth a retry.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from patchbox import wire as C
from patchbox.errors import AgentError, ConnectError, PatchboxError, ProtocolError
from patchbox.procfs import holds_socket
from patchbox.protocol.client import decode_header, encode_frame
from patchbox.protocol.discovery import connect_unix_ex, peer_pid
from patchbox.protocol.replies import decode_answer
from patchbox.wire import Msg

__all__ = ["Job", "run_jobs"]

_BUSY_RETRY_S = 0.002


@dataclass
class Job:
    """One connection's work: ``requests`` are sent one after the other; ``replies``
    gets each decoded answer; ``error`` the first failure (the rest are not sent)."""

    key: int  # the pid this job is for
    path: str
    requests: list[tuple[Msg, bytes]]
    alt: str = ""  # tried when ``path`` is absent or leads to another pid's agent
    inode: int = 0  # the listening socket's inode (/proc/net/unix), 0 if unknown
    replies: list[Any] = field(default_factory=list)
    error: PatchboxError | None = None
    retry: bool = False
    peer_pid: int | None = None  # SO_PEERCRED of the connection: the agent's pid here
    denied: bool = False  # connect() said EACCES/EPERM: the socket is not ours to use
    refused: bool = False  # connect() said ENOENT/ECONNREFUSED: nobody listens, nothing sent
    lost: bool = False  # connected, then the connection broke before the last reply


class _Conn:
    """One open connection of :func:`run_jobs`."""

    __slots__ = ("job", "sock", "fd", "deadline", "out", "buf", "index")

    def __init__(self, job: Job, sock: socket.socket, deadline: float) -> None:
        self.job = job
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.out = memoryview(b"")
        self.buf = bytearray()
        self.index = 0  # request being answered


def _raise_nofile(want: int) -> int:
    """Returns how many sockets may be open at once, raising the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want + 64 and soft != resource.RLIM_INFINITY:
        new = want + 64 if hard == resource.RLIM_INFINITY else min(hard, want + 64)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return max(1, min(want, soft - 64))


def _connect_error(job: Job, err: int) -> ConnectError:
    what = os.strerror(err)
    if err in (errno.ENOENT, errno.ECONNREFUSED):
        return ConnectError(
            f"pid {job.key}: agent socket {job.path} refuses connections "
            f"({what}): the process has exited"
        )
    if err in (errno.EACCES, errno.EPERM):
        return ConnectError(
            f"pid {job.key}: permission denied on {job.path}: run as root or as the process's user"
        )
    return ConnectError(f"pid {job.key}: cannot connect to {job.path}: {what}")


def run_jobs(jobs: list[Job], timeout: float = 10.0) -> None:
    """Runs every job to completion (a reply, an error, or its ``timeout``), up to as
    many at once as file descriptors allow; fills the jobs in place."""
    batch = _Batch(timeout, _raise_nofile(len(jobs)))
    try:
        batch.run(deque((0.0, j, 0.0) for j in jobs))
    finally:
        batch.close()


# A job not started yet: (not before this monotonic time, the job, its deadline or 0.0
# while it has none).
_Waiting = tuple[float, Job, float]


class _Batch:
    """The loop of one :func:`run_jobs`: its open connections by descriptor, on one
    epoll instance, and the frames it has encoded (most jobs send the same frames)."""

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit  # connections open at once at most
        self.active: dict[int, _Conn] = {}
        self.ep = select.epoll()
        self.frames: dict[tuple[Msg, int, bytes], bytes] = {}

    def run(self, waiting: deque[_Waiting]) -> None:
        """Runs until no job waits and no connection is open."""
        while waiting or self.active:
            self._start_waiting(waiting)
            if not self.active:
                if waiting:
                    time.sleep(_BUSY_RETRY_S)
                continue
            self._poll(busy=bool(waiting))
            self._expire()

    def close(self) -> None:
        """Closes what is still open (after an exception in :meth:`run`)."""
        for c in list(self.active.values()):
            c.sock.close()
        self.ep.close()

    def _start_waiting(self, waiting: deque[_Waiting]) -> None:
        """Starts the waiting jobs whose time has come, as many as the limit allows. A
        job whose agent's backlog is full waits a little, and fails (retryably) when it
        stayed full until the job's deadline."""
        now = time.monotonic()
        later: deque[_Waiting] = deque()
        while waiting and len(self.active) < self.limit:
            not_before, job, deadline = waiting.popleft()
            deadline = deadline or now + self.timeout
            if not_before > now:
                later.append((not_before, job, deadline))
            elif not self._start(job, deadline):
                if now >= deadline:
                    job.error = ConnectError(
                        f"pid {job.key}: the agent is busy (its "
                        f"queue stayed full for {self.timeout:g} s)"
                    )
                    job.retry = True
                else:
                    later.append((now + _BUSY_RETRY_S, job, deadline))
        waiting.extendleft(reversed(later))

    def _poll(self, busy: bool) -> None:
        """Waits for the open connections until the first deadline (a busy retry's
        pause at most while jobs wait) and serves each that is ready."""
        wait = min(c.deadline for c in self.active.values()) - time.monotonic()
        if busy:
            wait = min(wait, _BUSY_RETRY_S)
        for fd, events in self.ep.poll(max(0.0, wait)):
            c = self.active.get(fd)
            if c is None:
                continue
            if events & select.EPOLLOUT and c.out:
                self._flush(c)
            else:
                self._receive(c)

    def _expire(self) -> None:
        """Finishes (retryably) every connection whose deadline has passed."""
        now = time.monotonic()
        for c in [c for c in self.active.values() if c.deadline <= now]:
            self._finish(
                c,
                ConnectError(f"pid {c.job.key}: no reply from the agent within {self.timeout:g} s"),
                retry=True,
            )

    def _frame(self, msg: Msg, seq: int, payload: bytes) -> bytes:
        key = (msg, seq, payload)
        if key not in self.frames:
            self.frames[key] = encode_frame(msg, seq, payload)
        return self.frames[key]

    def _finish(self, c: _Conn, error: PatchboxError | None = None, retry: bool = False) -> None:
        if error is not None:
            c.job.error, c.job.retry = error, retry
        self.ep.unregister(c.fd)
        del self.active[c.fd]
        c.sock.close()

    def _send_next(self, c: _Conn) -> bool:
        """Returns False if the connection was finished."""
        msg, payload = c.job.requests[c.index]
        c.out = memoryview(self._frame(msg, c.index + 1, payload))
        return self._flush(c)

    def _flush(self, c: _Conn) -> bool:
        try:
            while c.out:
                c.out = c.out[c.sock.send(c.out) :]
        except BlockingIOError:
            self.ep.modify(c.fd, select.EPOLLOUT)
            return True
        except (BrokenPipeError, ConnectionResetError):
            # Closed on us (a refused peer is told why first): read what it said.
            c.out = memoryview(b"")
        except OSError as err:
            self._finish(c, ConnectError(f"pid {c.job.key}: cannot send: {err.strerror}"))
            return False
        self.ep.modify(c.fd, select.EPOLLIN)
        return True

    def _receive(self, c: _Conn) -> None:
        try:
            chunk = c.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as err:
            c.job.lost = True
            self._finish(c, ConnectError(f"pid {c.job.key}: connection lost: {err.strerror}"))
            return
        if not chunk:
            c.job.lost = True
            self._finish(
                c,
                ProtocolError(f"pid {c.job.key}: the agent closed the connection without replying"),
            )
            return
        c.buf += chunk
        self._take_replies(c)

    def _take_replies(self, c: _Conn) -> None:
        """Decodes every whole reply in ``c.buf``, each answering the request sent last,
        and sends the next request; finishes ``c`` after the last reply or at the first
        error."""
        while len(c.buf) >= C.HEADER_SIZE:
            try:
                rtype, rseq, length = decode_header(bytes(c.buf[: C.HEADER_SIZE]))
            except ProtocolError as err:
                self._finish(c, err)
                return
            if len(c.buf) < C.HEADER_SIZE + length:
                return
            payload = bytes(c.buf[C.HEADER_SIZE : C.HEADER_SIZE + length])
            del c.buf[: C.HEADER_SIZE + length]
            msg = c.job.requests[c.index][0]
            try:
                c.job.replies.append(decode_answer(msg, c.index + 1, rtype, rseq, payload))
            except (AgentError, ProtocolError) as err:
                self._finish(c, err)
                return
            c.index += 1
            if c.index == len(c.job.requests):
                self._finish(c)
                return
            if not self._send_next(c):
                return

    def _start(self, job: Job, deadline: float) -> bool:
        """Connects ``job`` and sends its first request; returns False when the agent's
        backlog is full (try again later). A job whose path is absent, refused or leads
        to another process tries its ``alt`` path, else ends with its error."""
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        err = connect_unix_ex(sock, job.path)
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            sock.close()
            return False
        if err in (errno.ENOENT, errno.ECONNREFUSED) and job.alt:
            sock.close()  # not here (another mount namespace): the next way there
            job.path, job.alt = job.alt, ""
            return self._start(job, deadline)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            job.error = _connect_error(job, err)
            job.denied = err in (errno.EACCES, errno.EPERM)
            job.refused = err in (errno.ENOENT, errno.ECONNREFUSED)
            return True
        job.peer_pid = peer_pid(sock) or None
        if not _reached(job):
            # The path led elsewhere: a link or another socket put there since the scan
            # (or a name of another mount namespace). Nothing is sent to that process.
            sock.close()
            if job.alt:
                job.path, job.alt, job.peer_pid = job.alt, "", None
                return self._start(job, deadline)
            who = f"pid {job.peer_pid}" if job.peer_pid else "an unknown process"
            job.peer_pid = None  # the outcome is the job's pid: nothing reached it
            job.error = ConnectError(
                f"pid {job.key}: {job.path} is answered by {who}, which does not hold the "
                f"agent socket listed for pid {job.key}: nothing sent"
            )
            return True
        c = _Conn(job, sock, deadline)
        self.active[c.fd] = c
        self.ep.register(c.fd, select.EPOLLOUT)
        self._send_next(c)
        return True


def _reached(job: Job) -> bool:
    """Returns whether the peer of ``job``'s connection is the agent of the job's pid: the
    pid itself, or a process holding the listening socket the scan found for that pid."""
    return job.peer_pid == job.key or bool(
        job.peer_pid and job.inode and holds_socket(job.peer_pid, job.inode)
    )
