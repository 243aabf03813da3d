"""The patchbox exception hierarchy.

Every failure a user can see is a :class:`PatchboxError`; the CLI prints ``str(err)`` as
one line on stderr and exits non-zero. Lower-level exceptions are converted with
``raise ... from err`` at one choke point per module.
"""
from __future__ import annotations

__all__ = [
    "PatchboxError",
    "PatchFormatError",
    "ElfError",
    "ExtractError",
    "UnsupportedRelocation",
    "ProtocolError",
    "AgentError",
    "ConnectError",
    "ConfigError",
]


class PatchboxError(Exception):
    """Base of every error patchbox reports to a user."""


class PatchFormatError(PatchboxError):
    """A patch file (or apply body) is corrupt, truncated or of an unknown version."""


class ElfError(PatchboxError):
    """An ELF file cannot be read or lacks what is needed (symbols, build-id)."""


class ExtractError(PatchboxError):
    """A patch cannot be built from the given objects."""


class UnsupportedRelocation(ExtractError):
    """A relocation type patchbox cannot carry into a live patch."""


class ProtocolError(PatchboxError):
    """The agent's reply does not follow the wire protocol."""


class ConnectError(PatchboxError):
    """The agent's socket cannot be found or connected."""


class ConfigError(PatchboxError):
    """patchbox itself is not set up (agent not built, compiler missing)."""


class AgentError(PatchboxError):
    """The agent refused a request; carries its error code and message."""

    def __init__(self, code: int, message: str) -> None:
        from patchbox.protocol.constants import ErrorCode

        try:
            self.name = ErrorCode(code).name
        except ValueError:
            self.name = f"ERROR_{code}"
        self.code = code
        self.message = message
        super().__init__(f"agent refused: {message} [{self.name}]")
