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
    "BuildError",
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


class BuildError(ExtractError):
    """A source tree cannot be built, a diff cannot be applied, or the diff is refused."""


class AgentError(PatchboxError):
    """The agent refused a request; carries its error code, the code's name and message.

    ``name`` is handed in by the caller that knows the wire constants (this module
    imports nothing of the project); it defaults to ``ERROR_<code>``.
    """

    def __init__(self, code: int, message: str, name: str | None = None) -> None:
        self.code = code
        self.name = name or f"ERROR_{code}"
        self.message = message
        super().__init__(f"agent refused: {message} [{self.name}]")
