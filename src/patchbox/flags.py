"""The compile and link flags a patchable program (and its patch objects) is built with.

`patchbox config --cflags` prints :func:`patch_cflags` of this host's architecture
(``--arch`` another's); extract-patch checks that patch objects have the patchable entry
these flags create. tools/install_agent.py asks this module (from the source tree, with
the standard library only) for each architecture's patchbox.pc.
"""

from __future__ import annotations

from patchbox.arch import Arch, host_arch

__all__ = ["PATCH_CFLAGS", "SECTION_CFLAGS", "LINK_FLAGS", "patch_cflags"]

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


# This host's: the patchable entry (NOPs before each function, room for the jump into
# the padding, and at its entry, the atomic publish site; docs/redirect.md) and one
# section per function/object.
PATCH_CFLAGS: list[str] = patch_cflags()
