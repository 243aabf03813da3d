"""The compile and link flags a patchable program (and its patch objects) is built with.

`patchbox config --cflags` prints PATCH_CFLAGS; extract-patch checks that patch objects
have the patchable entry these flags create.
"""

from __future__ import annotations

__all__ = ["PATCH_CFLAGS", "LINK_FLAGS"]

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
