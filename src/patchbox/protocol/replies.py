"""Reply payloads of the wire protocol (docs/protocol.md "Reply payload", "Messages").

Every reply payload starts with an ``i32 status``; a non-zero status is followed by one
``str message`` and raises :class:`patchbox.errors.AgentError`. An OK status is followed by
the message-specific fields, read here by their layouts (``C.LIST_REPLY``...: generated
from wire/constants.toml, the agent's reply writers checked against them). Any overrun,
bad count or trailing byte raises :class:`patchbox.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from patchbox import wire as C
from patchbox.errors import AgentError, ProtocolError
from patchbox.format.codec import Reader, read_fields
from patchbox.wire import REPLY_BIT, ErrorCode, ListedState, Msg

__all__ = [
    "PatchFunction",
    "AppliedPatch",
    "ApplyResult",
    "RemoveResult",
    "TestResult",
    "check_status",
    "decode_reply",
    "decode_answer",
    "raise_connection_error",
    "CONNECTION_ERRORS",
    "DECODERS",
]


@dataclass(frozen=True)
class PatchFunction:
    """One redirected function of an applied patch (absolute addresses in the process)."""

    symbol: str
    target: int  # absolute address of the original function
    new: int  # absolute address of the replacement entry
    new_size: int


@dataclass(frozen=True)
class AppliedPatch:
    """One entry of a LIST reply."""

    name: str
    id: int
    applied_at: int  # unix time, nanoseconds
    text_addr: int
    text_size: int
    data_addr: int
    data_size: int
    functions: list[PatchFunction] = field(default_factory=list)
    object: str = ""  # "" for the executable, else the path of the library it patches
    hold_ns: int = 0  # held entry jumps: how long the agent waited for the threads
    # APPLIED, or UNLOADED: its library was unloaded (dlclose); nothing of it is written
    # again and REMOVE drops the record only (docs/reach.md, "Shared libraries").
    state: ListedState = ListedState.APPLIED

    @property
    def unloaded(self) -> bool:
        """Returns whether the patch's library was unloaded since it was applied."""
        return self.state == ListedState.UNLOADED

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-ready dict of this entry (``state``: "applied" or "unloaded")."""
        d = asdict(self)
        d["state"] = self.state.name.lower()
        return d


@dataclass(frozen=True)
class ApplyResult:
    """The APPLY reply: the id the agent gave the patch and where it was placed."""

    id: int
    text_addr: int
    data_addr: int
    elapsed_ns: int  # time the agent spent checking, copying and redirecting


@dataclass(frozen=True)
class RemoveResult:
    """The REMOVE reply: the agent's time, and the state the patch was in (APPLIED: its
    original bytes were restored; UNLOADED: its library was gone, nothing was written)."""

    elapsed_ns: int
    state: ListedState

    @property
    def written(self) -> bool:
        """Returns whether the agent wrote the original bytes back."""
        return self.state == ListedState.APPLIED


class TestResult(NamedTuple):
    """The TEST reply; unpacks as ``(passed, detail)``."""

    passed: bool
    detail: str


def check_status(r: Reader) -> None:
    """Reads the status; returns if OK, raises AgentError(code, message) otherwise."""
    status = r.i32("status")
    if status == ErrorCode.OK:
        return
    message = r.str("message")
    r.end()
    try:
        name = ErrorCode(status).name
    except ValueError:
        name = None  # a newer agent's code: AgentError names it by number
    raise AgentError(status, message, name)


def _state(value: int, where: str) -> ListedState:
    try:
        return ListedState(value)
    except ValueError:
        raise ProtocolError(f"{where} = {value}: not a patch state") from None


def _empty(r: Reader) -> None:
    read_fields(r, C.DEBUG_REPLY)


def _info(r: Reader) -> dict[str, str]:
    info: dict[str, str] = read_fields(r, C.INFO_REPLY)["info"]
    return info


def _listed(p: dict[str, Any], where: str) -> AppliedPatch:
    functions = [PatchFunction(**f) for f in p["functions"]]
    state = _state(p["state"], f"{where}.state")
    return AppliedPatch(**{**p, "functions": functions, "state": state})


def _list(r: Reader) -> list[AppliedPatch]:
    # A count the payload cannot hold is refused before looping (read_fields: each entry
    # takes at least C.LISTED_PATCH_MIN_SIZE bytes).
    patches = read_fields(r, C.LIST_REPLY)["patches"]
    return [_listed(p, f"patch[{i}]") for i, p in enumerate(patches)]


def _apply(r: Reader) -> ApplyResult:
    return ApplyResult(**read_fields(r, C.APPLY_REPLY))


def _remove(r: Reader) -> RemoveResult:
    fields = read_fields(r, C.REMOVE_REPLY)
    return RemoveResult(fields["elapsed_ns"], _state(fields["state"], "state"))


def _test(r: Reader) -> TestResult:
    fields = read_fields(r, C.TEST_REPLY)
    if fields["passed"] not in (0, 1):
        raise ProtocolError(f"TEST reply: passed = {fields['passed']}, expected 0 or 1")
    return TestResult(bool(fields["passed"]), fields["detail"])


# The reply layout of each message, as data (one decoder per message id).
DECODERS: dict[Msg, Callable[[Reader], Any]] = {
    Msg.INFO: _info,
    Msg.LIST: _list,
    Msg.APPLY: _apply,
    Msg.REMOVE: _remove,
    Msg.TEST: _test,
    Msg.DEBUG: _empty,
}


def decode_reply(msg: Msg, payload: bytes) -> Any:
    """Returns the decoded OK reply to ``msg``; raises AgentError or ProtocolError."""
    r = Reader(payload, ProtocolError, f"{Msg(msg).name} reply")
    check_status(r)
    result = DECODERS[Msg(msg)](r)
    r.end()
    return result


# Errors the agent may send about the connection itself rather than about the request
# (a refused peer, a frame it could not read): accepted whatever the reply's type/seq.
CONNECTION_ERRORS = frozenset(
    {
        ErrorCode.PERMISSION,
        ErrorCode.BAD_MAGIC,
        ErrorCode.BAD_VERSION,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNKNOWN_MESSAGE,
    }
)


def raise_connection_error(payload: bytes) -> None:
    """Raises AgentError if ``payload`` is a connection-level error reply; else returns."""
    r = Reader(payload, ProtocolError, "reply")
    try:
        status = r.i32("status")
        if status not in CONNECTION_ERRORS:
            return
        r.pos = 0
        check_status(r)
    except ProtocolError:
        return


def decode_answer(msg: Msg, seq: int, reply_type: int, reply_seq: int, payload: bytes) -> Any:
    """Returns the decoded reply to request ``msg``/``seq`` given the reply frame's type,
    seq and payload; raises AgentError (the agent refused, or a connection-level error)
    or ProtocolError (the reply does not answer the request)."""
    if reply_type != (msg | REPLY_BIT) or reply_seq != seq:
        raise_connection_error(payload)
        if reply_type != (msg | REPLY_BIT):
            raise ProtocolError(
                f"reply type {reply_type:#x} does not answer {Msg(msg).name} "
                f"(expected {msg | REPLY_BIT:#x})"
            )
        raise ProtocolError(f"reply seq {reply_seq} does not match request seq {seq}")
    return decode_reply(msg, payload)
