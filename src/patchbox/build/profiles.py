"""Per-profile knowledge used by `patchbox build` when comparing objects.

A *reporting function* receives ``__LINE__`` (and ``__FILE__``) from a macro. When a diff
inserts lines above such a macro, every function using it gets a different immediate in
the argument set-up of the call; :mod:`patchbox.build.diff` does not count that as a
change. ``PROFILES`` itself stays in :mod:`patchbox.build.extract`.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reporters", "reporters_for"]

# glibc's assert() and error_at_line(); BSD-style err()/warn() take no line number.
GENERIC_REPORTERS = frozenset({
    "__assert_fail", "__assert_perror_fail", "__assert", "__assert_rtn", "error_at_line",
})

# QEMU: error_setg()/error_setg_errno() expand to *_internal(errp, __FILE__, __LINE__, ...);
# error_report/warn_report are reached from macros that also log the location; g_assert*
# expand to g_assertion_message*(domain, __FILE__, __LINE__, ...); trace points are
# trace_<event>() / _nocheck__trace_<event>() functions.
QEMU_REPORTERS = GENERIC_REPORTERS | frozenset({
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
})
QEMU_PREFIXES = ("trace_", "_nocheck__trace_", "_trace_")


@dataclass(frozen=True)
class Reporters:
    """Names (and name prefixes) of functions whose ``__LINE__`` argument is not a change."""

    names: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.names or name.startswith(self.prefixes))


def reporters_for(profile: str, extra: tuple[str, ...] | list[str] = ()) -> Reporters:
    """Returns the reporting functions of ``profile`` (``generic`` or ``qemu``) plus ``extra``."""
    if profile == "qemu":
        return Reporters(QEMU_REPORTERS | frozenset(extra), QEMU_PREFIXES)
    return Reporters(GENERIC_REPORTERS | frozenset(extra))
