"""Kernel modules for the guest: which ``.ko`` files a set of drivers needs, in load order.

A kernel package ships no ``modules.dep``: ``depmod`` writes it when the package is
installed, and the guest's kernel is only unpacked. Each module's ``.modinfo`` section
holds what depmod reads for it (``depends=`` as modpost computed it, ``softdep=``), so the
order is resolved from there; modules built into the kernel (``modules.builtin``) are
left out.
"""

from __future__ import annotations

import io
import lzma
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from elftools.elf.elffile import ELFFile

__all__ = ["Module", "builtin_names", "index_modules", "load_order", "modinfo", "module_name"]

SUFFIXES = (".ko", ".ko.xz")


class Module(NamedTuple):
    """One loadable module: its name (``-`` as ``_``), file, and the modules it needs first."""

    name: str
    path: Path
    depends: tuple[str, ...]


def module_name(filename: str) -> str:
    """Returns the module name of a file or a ``depends=`` entry: ``t10-pi.ko`` → ``t10_pi``."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def read_module(path: Path) -> bytes:
    """Returns the ELF bytes of a module file (``.ko.xz`` decompressed)."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo(elf: bytes) -> list[tuple[str, str]]:
    """Returns the ``key=value`` pairs of a module's ``.modinfo`` section, in order."""
    section = ELFFile(io.BytesIO(elf)).get_section_by_name(".modinfo")
    if section is None:
        raise ValueError("no .modinfo section: not a kernel module")
    pairs = []
    for item in section.data().split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            pairs.append((key, value))
    return pairs


def _needs(pairs: list[tuple[str, str]]) -> tuple[str, ...]:
    """Returns the modules named by ``depends=`` and by ``softdep=`` ``pre:`` lists."""
    out: list[str] = []
    for key, value in pairs:
        if key == "depends":
            out += [module_name(d) for d in value.split(",") if d]
        elif key == "softdep":
            words = value.split()
            if "pre:" in words:
                after = words[words.index("pre:") + 1 :]
                pre = after[: after.index("post:")] if "post:" in after else after
                out += [module_name(d) for d in pre]
    return tuple(out)


def index_modules(modroot: Path) -> dict[str, Path]:
    """Returns {module name: file} for every module under ``modroot`` (``lib/modules/VER``)."""
    return {
        module_name(p.name): p
        for p in sorted((modroot / "kernel").rglob("*"))
        if p.name.endswith(SUFFIXES)
    }


def builtin_names(modroot: Path) -> set[str]:
    """Returns the names of the modules built into the kernel (``modules.builtin``)."""
    listing = modroot / "modules.builtin"
    return {module_name(Path(line).name) for line in listing.read_text().split()}


def load_order(wanted: Iterable[str], index: dict[str, Path], builtin: set[str]) -> list[Module]:
    """Returns the modules ``wanted`` and all they need, each after what it needs; built-in
    ones are left out. A name neither built in nor in ``index`` is a ``KeyError``; soft
    dependencies missing from the package are skipped."""
    order: list[Module] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, soft: bool) -> None:
        if name in done or name in builtin:
            return
        if name not in index:
            if soft:
                return
            raise KeyError(f"module {name}: neither built in nor in the package")
        if name in visiting:
            raise ValueError(f"module {name}: dependency cycle")
        visiting.add(name)
        pairs = modinfo(read_module(index[name]))
        hard = {module_name(d) for k, v in pairs if k == "depends" for d in v.split(",") if d}
        needs = _needs(pairs)
        for dep in needs:
            visit(dep, soft=dep not in hard)
        visiting.discard(name)
        done.add(name)
        order.append(Module(name, index[name], needs))

    for name in wanted:
        visit(module_name(name), soft=False)
    return order
