"""Profiles: what patchbox knows about one kind of program, in one object each.

``generic`` is any C program; ``qemu`` (``--qemu``) is QEMU. A profile says

- which *reporting functions* receive ``__LINE__`` (and ``__FILE__``) from a macro: when
  a diff inserts lines above such a macro, every function using it gets a different
  immediate in the argument set-up of the call, which :mod:`patchbox.compare` does not
  count as a change;
- whether a patch's memory may be reused after it is removed (QEMU runs code on
  coroutine stacks the agent cannot scan: never, the RETAIN apply flag; docs/qemu.md);
- which facts about the program's build go into the patch meta (QEMU's version from its
  configured build directory);
- where the program's configured build directory is, when it is not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from patchbox.errors import ExtractError

__all__ = ["Reporters", "Profile", "GENERIC", "QEMU", "PROFILES", "get_profile"]

# glibc's assert() and error_at_line(); BSD-style err()/warn() take no line number.
GENERIC_REPORTERS = frozenset(
    {"__assert_fail", "__assert_perror_fail", "__assert", "__assert_rtn", "error_at_line"}
)

# QEMU: error_setg()/error_setg_errno() expand to *_internal(errp, __FILE__, __LINE__, ...);
# error_report/warn_report are reached from macros that also log the location; g_assert*
# expand to g_assertion_message*(domain, __FILE__, __LINE__, ...); trace points are
# trace_<event>() / _nocheck__trace_<event>() functions.
QEMU_REPORTERS = GENERIC_REPORTERS | frozenset(
    {
        "error_setg_internal", "error_setg_errno_internal", "error_setg_win32_internal",
        "error_report", "error_vreport", "warn_report", "warn_vreport", "info_report",
        "error_report_once_cond", "warn_report_once_cond",
        "g_assertion_message", "g_assertion_message_expr", "g_assertion_message_cmpnum",
        "g_assertion_message_cmpstr", "g_assertion_message_error", "g_return_if_fail_warning",
        "g_log", "g_warn_message", "qemu_log", "qemu_log_mask_and_addr",
        "error_handle", "error_propagate", "error_exit",
        # QOM casts (OBJECT_CHECK, OBJECT_CLASS_CHECK, OBJECT_GET_CLASS, DECLARE_*_CHECKER):
        # (obj, typename, __FILE__, __LINE__, __func__).
        "object_dynamic_cast_assert", "object_class_dynamic_cast_assert",
    }
)  # fmt: skip
QEMU_PREFIXES = ("trace_", "_nocheck__trace_", "_trace_")

# What QEMU's build records about itself (config-host.h, qemu-version.h in the build dir).
_QEMU_DEFINES = {
    "QEMU_VERSION": "qemu_version",
    "QEMU_PKGVERSION": "qemu_pkgversion",
    "QEMU_FULL_VERSION": "qemu_full_version",
}


@dataclass(frozen=True)
class Reporters:
    """Names (and name prefixes) of functions whose ``__LINE__`` argument is not a change."""

    names: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.names or name.startswith(self.prefixes))


@dataclass(frozen=True)
class Profile:
    """Everything patchbox knows about one kind of program (see the module docstring)."""

    name: str
    reporters: Reporters
    retain: bool = False  # patches carry the RETAIN apply flag
    build_defines: dict[str, str] = field(default_factory=dict)  # #define -> meta key

    def with_reporters(self, extra: tuple[str, ...] | list[str]) -> Profile:
        """Returns this profile with ``extra`` reporting functions added."""
        if not extra:
            return self
        more = Reporters(self.reporters.names | frozenset(extra), self.reporters.prefixes)
        return Profile(self.name, more, self.retain, self.build_defines)

    def build_facts(self, build_dir: Path) -> dict[str, str]:
        """Returns the patch meta this profile reads from the program's configured build
        directory (QEMU: its version from config-host.h / qemu-version.h); {} if none."""
        facts: dict[str, str] = {}
        if not self.build_defines:
            return facts
        for header in ("config-host.h", "qemu-version.h"):
            try:
                lines = (Path(build_dir) / header).read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                match line.split(None, 2):
                    case ["#define", name, value] if name in self.build_defines:
                        facts[self.build_defines[name]] = value.strip().strip('"')
        return facts

    def default_build_dir(self, binary: Path) -> Path | None:
        """Returns the configured build directory of ``binary`` when the profile knows it
        (QEMU: the binary's directory if it holds compile_commands.json), else None."""
        if self.name == "qemu" and (binary.parent / "compile_commands.json").is_file():
            return binary.parent
        return None


GENERIC = Profile("generic", Reporters(GENERIC_REPORTERS))
QEMU = Profile(
    "qemu", Reporters(QEMU_REPORTERS, QEMU_PREFIXES), retain=True, build_defines=_QEMU_DEFINES
)
PROFILES: dict[str, Profile] = {p.name: p for p in (GENERIC, QEMU)}


def get_profile(name: str | Profile) -> Profile:
    """Returns the profile named ``name``; raises ExtractError if there is none."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ExtractError(f"unknown profile {name!r} (one of {', '.join(PROFILES)})") from None
