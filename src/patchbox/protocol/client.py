"""The wire protocol client: framing, agent socket discovery and typed requests.

One :class:`Client` is one connection to one agent (docs/protocol.md). Requests are sent
one at a time; each reply must carry the request's ``seq`` and the type ``id | REPLY_BIT``.

Errors: the agent's refusals raise :class:`AgentError`; replies that do not follow the
protocol raise :class:`ProtocolError`; a socket that cannot be found, reached or read in
time raises :class:`ConnectError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from patchbox import procfs
from patchbox import wire as C
from patchbox.errors import ConnectError, PatchboxError, ProtocolError
from patchbox.format.codec import Writer
from patchbox.protocol.discovery import (
    Candidate,
    agent_inside,
    connect_unix,
    discover,
    peer_pid,
    sweep_stale_sockets,
)
from patchbox.protocol.replies import decode_answer, raise_connection_error
from patchbox.wire import Msg

if TYPE_CHECKING:
    from pathlib import Path

    from patchbox.protocol.results import AppliedPatch, ApplyResult, RemoveResult, TestResult

__all__ = [
    "FRAME",
    "DEFAULT_TIMEOUT",
    "Client",
    "encode_frame",
    "decode_header",
]

# magic, version, type, seq, length (C.HEADER_FIELDS; struct pbx_header in the agent)
FRAME = struct.Struct(C.HEADER_FORMAT)
DEFAULT_TIMEOUT = 10.0
LINK_HINT = (
    "is the program linked with `patchbox config --libs` "
    "(or run with LD_PRELOAD=$(patchbox config --preload))?"
)

DENIED_HINT = "run as root or as the process's user, or pass -s SOCKET"
LOST_HINT = (
    "the process has the patchbox agent but no socket of its listens: the agent is "
    "still starting, or it could not bind (PATCHBOX_SOCK_DIR missing or not writable), "
    "or it lost its socket and could not bind it again (a daemon that closed every "
    "descriptor, then dropped the privileges its socket directory needs: start it with "
    "PATCHBOX_SOCK_DIR set to a directory its user can write); the agent says why on "
    "its stderr"
)


def encode_frame(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    """Returns the frame (header + payload) of one request."""
    if len(payload) > C.MAX_PAYLOAD:
        raise ProtocolError(
            f"request of {len(payload)} bytes exceeds the protocol maximum of {C.MAX_PAYLOAD}"
        )
    fields = {"magic": C.MAGIC, "version": C.VERSION, "type": msg_type}
    fields |= {"seq": seq & 0xFFFFFFFF, "length": len(payload)}
    return FRAME.pack(*(fields[name] for name in C.HEADER_FIELDS)) + payload


def decode_header(header: bytes) -> tuple[int, int, int]:
    """Returns (type, seq, length) of a reply header; raises ProtocolError if invalid."""
    if len(header) != C.HEADER_SIZE:
        raise ProtocolError(f"reply header is {len(header)} bytes, expected {C.HEADER_SIZE}")
    fields = dict(zip(C.HEADER_FIELDS, FRAME.unpack(header), strict=True))
    magic, version, msg_type = fields["magic"], fields["version"], fields["type"]
    seq, length = fields["seq"], fields["length"]
    if magic != C.MAGIC:
        raise ProtocolError(
            f"reply has bad magic {magic:#010x} (expected {C.MAGIC:#010x}): "
            "is this a patchbox agent socket?"
        )
    if version != C.VERSION:
        raise ProtocolError(f"reply has protocol version {version}, this client speaks {C.VERSION}")
    if length > C.MAX_PAYLOAD:
        raise ProtocolError(
            f"reply length {length} exceeds the protocol maximum of {C.MAX_PAYLOAD}"
        )
    return msg_type, seq, length


class Client:
    """One connection to a patchbox agent; use as a context manager.

    ``Client(socket_path)`` or ``Client(pid=PID)``; the socket of a pid is found when
    connecting, by :func:`patchbox.protocol.discovery.discover`. ``timeout`` (seconds)
    bounds connect and each reply.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        pid: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if (socket_path is None) == (pid is None):
            raise ValueError("give exactly one of socket_path and pid")
        # The socket's path (see `path`); for a pid, known once connected.
        self._path = os.fspath(socket_path) if socket_path is not None else None
        self.pid = pid
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.seq = 0
        self.peer: int | None = None  # the pid that accepted the connection (SO_PEERCRED)

    @property
    def path(self) -> Path | None:
        """Returns the socket's path: as given, or for a pid the one connected to (None
        before). Kept as a str and made a Path only when asked: `patchbox info -p`, which
        never asks unless something fails, does not import pathlib (start-up)."""
        from pathlib import Path

        return Path(self._path) if self._path is not None else None

    # -- connection ---------------------------------------------------------------

    def connect(self) -> Client:
        """Returns self after connecting (no-op if connected); raises ConnectError."""
        if self.sock is not None:
            return self
        if self.pid is None:
            path = self.path
            assert path is not None
            self.sock = self._open(Candidate(os.fspath(path), os.fspath(path), "-s"))
            self.peer = peer_pid(self.sock) or None
            return self
        found = discover(self.pid)
        tried: list[str] = []
        failure: ConnectError | None = None
        for candidate in found.candidates:
            try:
                sock = self._open(candidate)
                self._check_peer(sock, candidate)
            except FileNotFoundError:
                tried.append(f"{candidate.path} ({candidate.source})")
                continue
            except ConnectError as err:
                if candidate.listening:
                    raise  # the agent's own socket: its error is the answer
                failure = failure or err
                tried.append(f"{candidate.path} ({candidate.source}): {err}")
                continue
            self.sock = sock
            self._path = candidate.path
            self.peer = self.pid
            return self
        if failure is not None and len(found.candidates) == 1:
            raise failure
        where = "; ".join(found.notes + ([f"tried {', '.join(tried)}"] if tried else []))
        if found.denied:
            hint = DENIED_HINT
        elif agent_inside(self.pid):
            hint = LOST_HINT
        else:
            hint = LINK_HINT
        raise ConnectError(f"no agent socket for pid {self.pid}: {where}: {hint}")

    def _check_peer(self, sock: socket.socket, candidate: Candidate) -> None:
        """Closes ``sock`` and raises ConnectError unless the process listening on it is
        the pid asked for: a path is looked up again at connect(), and whoever controls a
        directory on it (the target's owner, in its mount namespace too) could have put
        a link to another process's agent there since it was found."""
        got = peer_pid(sock)
        if got != self.pid:
            sock.close()
            raise ConnectError(
                f"{candidate.path} ({candidate.source}) is answered by "
                f"{f'pid {got}' if got else 'an unknown process'}, not pid {self.pid}: "
                f"not used (a link or another socket was put at that path)"
            )

    def _open(self, candidate: Candidate) -> socket.socket:
        """Returns a socket connected to ``candidate``; FileNotFoundError if there is
        no file, ConnectError for the other failures."""
        shown = candidate.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            connect_unix(sock, candidate.connect_path)
        except FileNotFoundError as err:
            sock.close()
            if self.pid is None:
                raise ConnectError(f"no agent socket for {shown}: {LINK_HINT}") from err
            raise
        except ConnectionRefusedError as err:
            sock.close()
            raise ConnectError(
                f"agent socket {shown} refuses connections: "
                "the process has exited or its agent is not running"
            ) from err
        except PermissionError as err:
            sock.close()
            raise ConnectError(
                f"permission denied connecting to {shown}: run as root or as the process's user"
            ) from err
        except TimeoutError as err:
            sock.close()
            raise ConnectError(f"timed out after {self.timeout:g} s connecting to {shown}") from err
        except OSError as err:
            sock.close()
            if err.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
                raise ConnectError(f"{shown} is not an agent socket") from err
            raise ConnectError(f"cannot connect to {shown}: {err.strerror or err}") from err
        return sock

    def close(self) -> None:
        """Closes the connection (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- framing ------------------------------------------------------------------

    def _recv_exact(self, n: int, what: str) -> bytes:
        assert self.sock is not None
        chunks: list[bytes] = []
        got = 0
        while got < n:
            try:
                chunk = self.sock.recv(min(n - got, 1 << 20))
            except TimeoutError as err:
                self.close()
                raise ConnectError(
                    f"no reply from the agent at {self.path} within {self.timeout:g} s"
                ) from err
            except OSError as err:
                self.close()
                raise ConnectError(
                    f"connection to {self.path} lost: {err.strerror or err}"
                ) from err
            if not chunk:
                self.close()
                gone = self._peer_gone()
                if gone:
                    raise ProtocolError(gone)
                if got == 0 and what == "header":
                    raise ProtocolError(
                        f"the agent at {self.path} closed the connection without replying"
                    )
                raise ProtocolError(
                    f"reply truncated: {what} has {got} of {n} bytes, "
                    "then the agent closed the connection"
                )
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _peer_gone(self) -> str:
        """Returns why the reply never came if the process that accepted the connection
        has exited (its socket file swept: nobody listens there any more), else ""."""
        if self.peer is None:
            return ""
        state = procfs.process_state(self.peer)  # None: gone (or unreadable)
        if state is not None and state not in ("Z", "X"):  # Z: not reaped yet
            return ""
        path = self.path
        if path is not None and path.is_absolute():
            with contextlib.suppress(OSError, PatchboxError):
                sweep_stale_sockets(path.parent)  # the agent's rule: only if stale
        return (
            f"pid {self.peer} exited while its agent was serving the request: nothing of "
            f"it outlives the process (its socket {path} is stale)"
        )

    def _read_reply(self) -> tuple[int, int, bytes]:
        msg_type, seq, length = decode_header(self._recv_exact(C.HEADER_SIZE, "header"))
        return msg_type, seq, self._recv_exact(length, "payload")

    def request(
        self,
        msg: Msg,
        payload: bytes = b"",
        after_send: Callable[[], None] | None = None,
        reply_timeout: float | None = None,
    ) -> Any:
        """Returns the decoded reply to one request (see replies.DECODERS). ``after_send``
        runs between sending and reading the reply (the hold of held entry jumps), whose
        wait is then ``reply_timeout`` when given."""
        frame = encode_frame(msg, self.seq + 1, payload)
        self.connect()
        assert self.sock is not None
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        try:
            self.sock.sendall(frame)
        except TimeoutError as err:
            self.close()
            raise ConnectError(
                f"timed out after {self.timeout:g} s sending to {self.path}"
            ) from err
        except (BrokenPipeError, ConnectionResetError) as err:
            # The agent may have refused us (PERMISSION) and closed: read its reason.
            try:
                self._read_connection_error()
            finally:
                self.close()
            raise ConnectError(f"the agent at {self.path} closed the connection") from err
        except OSError as err:
            self.close()
            raise ConnectError(f"cannot send to {self.path}: {err.strerror or err}") from err
        if after_send is not None:
            after_send()
        if reply_timeout is not None:
            self.sock.settimeout(reply_timeout)
        try:
            msg_type, seq, reply = self._read_reply()
        finally:
            if reply_timeout is not None and self.sock is not None:
                self.sock.settimeout(self.timeout)
        return decode_answer(msg, self.seq, msg_type, seq, reply)

    def _read_connection_error(self) -> None:
        """Raises the agent's pending error reply, if one can be read; else returns."""
        try:
            _type, _seq, reply = self._read_reply()
        except (ProtocolError, ConnectError):
            return
        raise_connection_error(reply)

    # -- messages -----------------------------------------------------------------

    def info(self) -> dict[str, str]:
        """Returns the agent's INFO key/value facts (docs/protocol.md INFO)."""
        return cast("dict[str, str]", self.request(Msg.INFO))

    def list(self) -> list[AppliedPatch]:
        """Returns the applied patches, in the order they were applied."""
        return cast("list[AppliedPatch]", self.request(Msg.LIST))

    def apply(
        self,
        body: bytes,
        after_send: Callable[[], None] | None = None,
        reply_timeout: float | None = None,
    ) -> ApplyResult:
        """Returns where the agent placed the patch whose apply body is ``body`` (sent as
        is); ``after_send`` and ``reply_timeout`` as for :meth:`request`."""
        return cast("ApplyResult", self.request(Msg.APPLY, bytes(body), after_send, reply_timeout))

    def remove(self, name: str) -> RemoveResult:
        """Returns the agent's time to remove the patch ``name`` and whether it wrote the
        original bytes back (not for a patch whose library was unloaded)."""
        return cast("RemoveResult", self.request(Msg.REMOVE, bytes(Writer().str(name))))

    def test(self) -> TestResult:
        """Returns (passed, detail) of the agent's self-test."""
        return cast("TestResult", self.request(Msg.TEST))

    def debug(self, on: bool) -> None:
        """Turns the agent's verbose debug output on or off."""
        self.request(Msg.DEBUG, bytes(Writer().u8(1 if on else 0)))
