"""scripts/guest's initramfs pieces: the newc archive, the order kernel modules load in."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from guest.cpio import NEWC_FIELDS, NEWC_MAGIC, Archive
from guest.modules import builtin_names, index_modules, load_order, modinfo, module_name


class NewcEntry(NamedTuple):
    """One entry of a newc archive: its name, its data and its 13 header fields."""

    name: str
    body: bytes
    head: dict[str, int]


def read_newc(data: bytes) -> list[NewcEntry]:
    """Returns the entries of a newc archive, read independently of guest.cpio."""
    out: list[NewcEntry] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        values = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        head = dict(zip(NEWC_FIELDS, values))
        name_at = pos + 110
        name = data[name_at : name_at + head["namesize"] - 1].decode()
        assert data[name_at + head["namesize"] - 1] == 0
        body_at = (name_at + head["namesize"] + 3) & ~3
        body = data[body_at : body_at + head["filesize"]]
        pos = (body_at + head["filesize"] + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append(NewcEntry(name, body, head))


def test_archive_entries_read_back_with_their_modes_data_and_device_numbers() -> None:
    a = Archive()
    a.add_dir("dev")
    a.add_char_device("dev/console", 5, 1)
    a.add_file("init", b"#!/bin/sh\n", 0o755)
    a.add_file("odd", b"12345")  # data not a multiple of 4
    a.add_symlink("bin/sh", "busybox")
    data = a.to_bytes()
    assert NEWC_MAGIC == b"070701"
    entries = {e.name: e for e in read_newc(data)}
    assert list(entries) == a.names() == ["dev", "dev/console", "init", "odd", "bin/sh"]
    assert stat.S_ISDIR(entries["dev"].head["mode"])
    console = entries["dev/console"].head
    assert stat.S_ISCHR(console["mode"]) and (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert (
        entries["init"].head["mode"] == stat.S_IFREG | 0o755
        and entries["init"].body == b"#!/bin/sh\n"
    )
    assert entries["odd"].body == b"12345"
    assert stat.S_ISLNK(entries["bin/sh"].head["mode"]) and entries["bin/sh"].body == b"busybox"
    assert len({e.head["ino"] for e in entries.values()}) == 5
    assert a.to_bytes() == data  # no clock, no host state: reproducible


def test_archive_refuses_a_name_twice() -> None:
    a = Archive()
    a.add_dir("bin")
    with pytest.raises(ValueError, match="bin"):
        a.add_file("bin", b"")


def fake_module(tree: Path, rel: str, *info: str) -> Path:
    """Returns a relocatable object at ``tree/kernel/REL`` whose .modinfo holds ``info`` and
    ``name=``."""
    path = tree / "kernel" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.with_suffix(".c")
    info = (*info, f"name={path.stem}")
    src.write_text(
        "".join(
            f'__attribute__((section(".modinfo"), used)) static const char i{n}[] = "{kv}";\n'
            for n, kv in enumerate(info)
        )
    )
    subprocess.run(["gcc", "-c", "-o", str(path), str(src)], check=True, capture_output=True)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    fake_module(tmp_path, "drivers/a/top.ko", "license=GPL", "depends=mid,t10-pi")
    fake_module(tmp_path, "drivers/b/mid.ko", "depends=base")
    fake_module(tmp_path, "lib/t10-pi.ko", "depends=")
    fake_module(tmp_path, "lib/base.ko", "softdep=pre: crypto_gone helper post: later")
    fake_module(tmp_path, "lib/helper.ko")
    fake_module(tmp_path, "lib/later.ko")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/c/inside.ko\n")
    return tmp_path


def test_modules_come_after_what_they_need(tree: Path) -> None:
    order = load_order(["top"], index_modules(tree), builtin_names(tree))
    names = [m.name for m in order]
    # softdep pre: modules first when the package has them (crypto_gone: skipped); post: not
    assert names == ["helper", "base", "mid", "t10_pi", "top"]
    assert order[-1].depends == ("mid", "t10_pi")
    assert dict(modinfo(order[-1].path.read_bytes()))["name"] == "top"


def test_built_in_modules_are_left_out_and_unknown_ones_refused(tree: Path) -> None:
    index, builtin = index_modules(tree), builtin_names(tree)
    assert builtin == {"inside"}
    assert load_order(["inside"], index, builtin) == []
    with pytest.raises(KeyError, match="nowhere"):
        load_order(["nowhere"], index, builtin)


def test_module_names_use_underscores() -> None:
    assert [module_name(n) for n in ("t10-pi.ko", "virtio_blk.ko.xz", "crc-t10dif")] == [
        "t10_pi",
        "virtio_blk",
        "crc_t10dif",
    ]
