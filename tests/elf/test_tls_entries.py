"""patchbox.elf.tls against binutils: the TLS GOT entries of compiled libraries and
executables as ``readelf -r`` lists them, the TLS segment as ``readelf -l`` does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from patchbox.elf.binary import Binary
from patchbox.elf.tls import read_tls

SRC = r"""
__thread long g;
static __thread long s = 5;
__thread long h __attribute__((visibility("hidden")));
extern __thread long imported;
__attribute__((noipa)) long f(void) { return g + s++ + h + imported; }
"""


def build(out: Path, src: str, *flags: str) -> Path:
    out.with_suffix(".c").write_text(src)
    cmd = ["gcc", "-O2", *flags, str(out.with_suffix(".c")), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def readelf_tls(path: Path) -> list[tuple[str, int, str]]:
    """Returns (type, offset, symbol or "") of every TLS relocation readelf lists."""
    out = subprocess.run(
        ["readelf", "-rW", str(path)], capture_output=True, text=True, check=False
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if (
            len(parts) >= 3
            and parts[2].startswith("R_X86_64_")
            and ("TPOFF" in parts[2] or "DTP" in parts[2] or "TLSDESC" in parts[2])
        ):
            sym = parts[4].split("@")[0] if len(parts) > 5 and parts[3] != "+" else ""
            rows.append((parts[2], int(parts[0], 16), sym))
    return rows


@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        ((), "pairs"),
        (("-ftls-model=initial-exec",), "tpoff"),
        (("-mtls-dialect=gnu2",), "descriptors"),
    ],
    ids=["dynamic", "initial-exec", "descriptors"],
)
def test_library_entries_are_readelfs(tmp_path: Path, flags: tuple[str, ...], kind: str) -> None:
    lib = build(tmp_path / "lib.so", SRC, "-fPIC", "-shared", *flags)
    image = read_tls(Binary(lib))
    kinds = {
        "R_X86_64_TPOFF64": image.tpoff,
        "R_X86_64_TLSDESC": image.descriptors,
        "R_X86_64_DTPMOD64": image.pairs,
    }
    rows = [r for r in readelf_tls(lib) if r[0] != "R_X86_64_DTPOFF64"]  # in the pairs
    assert rows
    for rtype, offset, sym in rows:
        slots = kinds[rtype]
        if sym:
            assert slots.by_name[sym] == offset, (rtype, sym)
        else:
            assert offset in slots.by_offset.values(), (rtype, offset)
    slots = getattr(image, kind)
    assert slots.find("g", None) is not None and slots.find("imported", None) is not None
    with Binary(lib) as b:
        offsets = {n: b.get_symbol(n).address for n in ("s", "h")}
    if kind == "pairs":  # the statics through local-dynamic: the {module id, 0} pair
        assert image.ld_pair is not None
    else:  # the library binds its statics to itself: symbol 0, found by offset
        assert all(slots.find(None, off) is not None for off in offsets.values()), offsets


def test_executable_segment_and_imported_slot(tmp_path: Path) -> None:
    build(tmp_path / "libi.so", "__thread long imported;\n", "-fPIC", "-shared")
    src = SRC + "int main(void) { return (int)f(); }\n"
    (tmp_path / "prog.c").write_text(src)
    exe = tmp_path / "prog"
    subprocess.run(
        ["gcc", "-O2", "-fPIE", "-pie", str(tmp_path / "prog.c"), "-o", str(exe),
         f"-L{tmp_path}", "-li"],
        check=True, capture_output=True,
    )  # fmt: skip
    image = read_tls(Binary(exe))
    phdrs = subprocess.run(
        ["readelf", "-lW", str(exe)], capture_output=True, text=True, check=False
    ).stdout
    tls = next(line.split() for line in phdrs.splitlines() if line.split()[:1] == ["TLS"])
    assert (image.memsz, image.align) == (int(tls[5], 16), int(tls[7], 16))
    # Only the library's variable needs the loader: its TPOFF64 slot, by name.
    assert [r for r in readelf_tls(exe) if r[0] == "R_X86_64_TPOFF64"] == [
        ("R_X86_64_TPOFF64", image.tpoff.by_name["imported"], "imported")
    ]
    assert not image.pairs.by_name and not image.pairs.by_offset
