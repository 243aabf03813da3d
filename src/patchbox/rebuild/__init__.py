"""Rebuild a tree: build copies of a source tree without and with a diff (make), or
recompile only the objects a diff affects from a configured meson/ninja build."""
