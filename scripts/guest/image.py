"""The guest's kernel and initramfs, made from Debian's packages and cached.

- The kernel: the package ``linux-image-amd64`` depends on (``linux-image-6.1.0-N-amd64``),
  fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed:
  its ``vmlinuz`` and the modules of :data:`WANTED_MODULES` with all they need.
- ``busybox-static``, fetched and unpacked the same way: the guest's shell and tools.
- ``pbguest.c``, compiled static with the host's gcc: the checked I/O loop.
- ``init.sh`` as ``/init``.

The result lies in ``$PATCHBOX_GUEST_CACHE/images/<key>/`` (default
``/var/cache/patchbox/guest``), ``key`` made of both packages' versions and a hash of this
recipe (these files and the compiler's version): a new kernel security update or a changed
recipe makes a new image, an unchanged one is reused (the four newest are kept).
Downloaded packages of the current versions are kept in ``debs/``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cpio import Archive
from .modules import builtin_names, index_modules, load_order, read_module

__all__ = [
    "CACHE",
    "WANTED_MODULES",
    "GuestImage",
    "ImageError",
    "ensure_image",
    "kernel_package",
    "package_version",
]

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PATCHBOX_GUEST_CACHE", "/var/cache/patchbox/guest"))
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
# Drivers of the guest's devices: virtio disk and network, the AHCI controller of a q35
# machine and the IDE one of a pc machine (ata_piix), the SCSI disk driver ATA disks show
# up through.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ahci", "ata_piix", "sd_mod")
# The files whose content makes the recipe (with the compiler's version).
RECIPE = ("image.py", "modules.py", "cpio.py", "init.sh", "pbguest.c")
KEEP_IMAGES = 4
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")


class ImageError(Exception):
    """A step of making the image failed; the message names the command and its output."""


@dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs ready for ``-kernel`` / ``-initrd``."""

    kernel: Path
    initrd: Path
    kernel_release: str  # uname -r of the guest
    packages: dict[str, str]  # package -> version
    modules: tuple[str, ...]  # in load order
    key: str

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        meta = json.loads((directory / "manifest.json").read_text())
        return cls(
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.gz",
            kernel_release=meta["kernel_release"],
            packages=meta["packages"],
            modules=tuple(meta["modules"]),
            key=meta["key"],
        )


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(
            f"{' '.join(map(str, args))}: exit {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return proc.stdout


def _show(package: str) -> dict[str, str]:
    """Returns the candidate version's fields of ``package`` (``apt-cache show``), or {}."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    fields: dict[str, str] = {}
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            if not line or line[0].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key, value.strip())
    return fields


class _AptLists:
    """Whether this run has updated apt's lists (it does once at most)."""

    updated = False


def package_fields(package: str) -> dict[str, str]:
    """Returns the candidate's fields of ``package``; updates apt's lists once when apt does
    not know it (a fresh machine has none)."""
    fields = _show(package)
    if not fields.get("Version") and not _AptLists.updated:
        _run("apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq")
        _AptLists.updated = True
        fields = _show(package)
    if not fields.get("Version"):
        raise ImageError(f"apt knows no package {package}")
    return fields


def package_version(package: str) -> str:
    """Returns the version apt would fetch of ``package``."""
    return package_fields(package)["Version"]


def kernel_package() -> tuple[str, str]:
    """Returns (name, version) of the kernel package ``linux-image-amd64`` depends on."""
    depends = package_fields(KERNEL_META).get("Depends", "")
    m = re.search(r"(linux-image-[0-9][^ ,]*-amd64)(?: \(= ([^)]+)\))?", depends)
    if not m:
        raise ImageError(f"{KERNEL_META} depends on no kernel image: {depends!r}")
    name = m.group(1)
    return name, m.group(2) or package_version(name)


def recipe_hash() -> str:
    """Returns a hash of the recipe's files and the compiler's version."""
    h = hashlib.sha256()
    for name in RECIPE:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(_run("gcc", "--version").splitlines()[0].encode())
    h.update(" ".join(CFLAGS + WANTED_MODULES).encode())
    return h.hexdigest()[:12]


def _fetch(package: str, version: str, debs: Path) -> Path:
    """Returns the .deb of ``package`` at ``version`` in ``debs``, downloading it if absent."""
    # apt-get download names it PACKAGE_VERSION_ARCH.deb, the epoch's colon as %3a.
    found = sorted(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # APT::Sandbox::User=root: the _apt user may not write into the cache directory.
        _run(
            "apt-get",
            "-o",
            "APT::Sandbox::User=root",
            "download",
            f"{package}={version}",
            cwd=Path(tmp),
        )
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageError(f"apt-get download {package}={version} gave {got}")
        return Path(shutil.move(str(got[0]), debs / got[0].name))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def compile_loop(out: Path) -> Path:
    """Returns ``out``: pbguest.c compiled as a static executable."""
    _run("gcc", *CFLAGS, "-o", out, HERE / "pbguest.c")
    return out


def _assemble(
    kernel_deb: Path, busybox_deb: Path, work: Path
) -> tuple[bytes, bytes, str, list[str]]:
    """Returns (vmlinuz, initramfs .gz, kernel release, modules in load order)."""
    kroot, broot = work / "kernel", work / "busybox"
    _run("dpkg-deb", "-x", kernel_deb, kroot)
    _run("dpkg-deb", "-x", busybox_deb, broot)
    modroots = sorted((kroot / "lib" / "modules").iterdir())
    if len(modroots) != 1:
        raise ImageError(f"{kernel_deb.name}: expected one lib/modules/RELEASE, found {modroots}")
    modroot = modroots[0]
    release = modroot.name
    vmlinuz = kroot / "boot" / f"vmlinuz-{release}"
    order = load_order(WANTED_MODULES, index_modules(modroot), builtin_names(modroot))

    cpio = Archive()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "lib"):
        cpio.add_dir(d)
    cpio.add_dir("lib/modules")
    # The kernel opens /dev/console for /init before anything is mounted.
    cpio.add_char_device("dev/console", 5, 1)
    cpio.add_file("bin/busybox", (broot / "bin" / "busybox").read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", (HERE / "init.sh").read_bytes(), 0o755)
    cpio.add_file("bin/pbguest", compile_loop(work / "pbguest").read_bytes(), 0o755)
    for mod in order:
        cpio.add_file(f"lib/modules/{mod.name}.ko", read_module(mod.path))
    cpio.add_file("lib/modules/load-order", "".join(m.name + "\n" for m in order).encode())
    initrd = gzip.compress(cpio.to_bytes(), compresslevel=6, mtime=0)
    return vmlinuz.read_bytes(), initrd, release, [m.name for m in order]


def ensure_image(cache: Path = CACHE) -> GuestImage:
    """Returns the guest image for the current packages and recipe, made if not cached."""
    kname, kversion = kernel_package()
    bversion = package_version(BUSYBOX)
    key = f"{kversion}_{bversion.split(':')[-1]}_{recipe_hash()}"
    directory = cache / "images" / key
    if (directory / "manifest.json").is_file():
        return GuestImage.load(directory)
    with _locked(cache / "lock"):
        if (directory / "manifest.json").is_file():
            return GuestImage.load(directory)
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        kernel_deb = _fetch(kname, kversion, debs)
        busybox_deb = _fetch(BUSYBOX, bversion, debs)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            vmlinuz, initrd, release, modules = _assemble(kernel_deb, busybox_deb, Path(tmp))
            staging = Path(tmp) / "image"
            staging.mkdir()
            (staging / "vmlinuz").write_bytes(vmlinuz)
            (staging / "initrd.gz").write_bytes(initrd)
            manifest = {
                "key": key,
                "kernel_release": release,
                "packages": {kname: kversion, BUSYBOX: bversion},
                "modules": modules,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(directory)
        # Packages of other versions (an older kernel) are not needed again; images of
        # other recipes (other checkouts) are kept, the KEEP_IMAGES newest.
        for old in set(debs.glob("*.deb")) - {kernel_deb, busybox_deb}:
            old.unlink()
        images = sorted((cache / "images").iterdir(), key=lambda p: p.stat().st_mtime)
        for old in images[:-KEEP_IMAGES]:
            shutil.rmtree(old, ignore_errors=True)
    return GuestImage.load(directory)
