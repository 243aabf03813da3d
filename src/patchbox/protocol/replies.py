"""Reply payloads of the wire protocol (docs/protocol.md "Reply payload", "Messages").

Every reply payload starts with an ``i32 status``; a non-zero status is followed by one
``str message`` and raises :class:`patchbox.errors.AgentError`. An OK status is followed by
the message-specific fields, read here by their layouts (``C.LIST_REPLY``...: generated
from wire/constants.toml, the agent's reply writers checked against them). Any overrun,
bad count or trailing byte raises :class:`patchbox.errors.ProtocolError` naming the field.

The typed results (:mod:`patchbox.protocol.results`, dataclasses) are imported by the
decoders that make them: INFO, which `patchbox info` asks in loops, needs none of them,
and :mod:`dataclasses` would cost its start-up 10 ms (docs/decisions.md, "Start-up").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from patchbox import wire as C
from patchbox.errors import AgentError, ProtocolError
from patchbox.format.codec import Reader, read_fields
from patchbox.wire import REPLY_BIT, ErrorCode, ListedState, Msg

if TYPE_CHECKING:
    from patchbox.protocol.results import AppliedPatch, ApplyResult, RemoveResult, TestResult

__all__ = [
    "check_status",
    "decode_reply",
    "decode_answer",
    "raise_connection_error",
    "CONNECTION_ERRORS",
    "DECODERS",
]


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
    from patchbox.protocol.results import AppliedPatch, PatchFunction

    functions = [PatchFunction(**f) for f in p["functions"]]
    state = _state(p["state"], f"{where}.state")
    return AppliedPatch(**{**p, "functions": functions, "state": state})


def _list(r: Reader) -> list[AppliedPatch]:
    # A count the payload cannot hold is refused before looping (read_fields: each entry
    # takes at least C.LISTED_PATCH_MIN_SIZE bytes).
    patches = read_fields(r, C.LIST_REPLY)["patches"]
    return [_listed(p, f"patch[{i}]") for i, p in enumerate(patches)]


def _apply(r: Reader) -> ApplyResult:
    from patchbox.protocol.results import ApplyResult

    return ApplyResult(**read_fields(r, C.APPLY_REPLY))


def _remove(r: Reader) -> RemoveResult:
    from patchbox.protocol.results import RemoveResult

    fields = read_fields(r, C.REMOVE_REPLY)
    return RemoveResult(fields["elapsed_ns"], _state(fields["state"], "state"))


def _test(r: Reader) -> TestResult:
    from patchbox.protocol.results import TestResult

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
