"""The compile and link flags a patchable program (and its patch objects) is built with.

`patchbox config --cflags` prints :func:`patch_cflags` of this host's architecture
(``--arch`` another's); extract-patch checks that patch objects have the patchable entry
these flags create. PATCH_CFLAGS is this host's, as a literal: tools/install_agent.py
reads it (without importing patchbox) for patchbox.pc.
"""

from __future__ import annotations

from patchbox.arch import Arch, host_arch

__all__ = ["PATCH_CFLAGS", "SECTION_CFLAGS", "LINK_FLAGS", "patch_cflags"]

# 6 NOPs before each function (room for the rel32 jump) and 2 at its entry (the atomic
# 2-byte publish site); one section per function/object so objects can be diffed and
# functions extracted one by one. See docs/redirect.md.
PATCH_CFLAGS: list[str] = [
    "-fpatchable-function-entry=8,6",
    "-ffunction-sections",
    "-fdata-sections",
]

# The agent finds the executable's identity through its GNU build-id.
LINK_FLAGS: list[str] = ["-Wl,--build-id=sha1", "-pthread"]

# One section per function/object so objects can be diffed and functions extracted one
# by one: every architecture's.
SECTION_CFLAGS: list[str] = ["-ffunction-sections", "-fdata-sections"]


def patch_cflags(arch: Arch | None = None) -> list[str]:
    """Returns the compile flags of a patchable program for ``arch`` (default: this
    host's): its patchable entry (``EntryLayout.flag`` and ``cflags``), then
    :data:`SECTION_CFLAGS`."""
    arch = arch or host_arch()
    return [arch.entry.flag, *arch.entry.cflags, *SECTION_CFLAGS]
