"""The test guest (docs/qemu.md, "A real guest"): a Linux guest under TCG running a checked
I/O loop on a virtio-blk disk, an AHCI (or IDE) disk and virtio-net, and the host side that
starts and watches it. Run as ``python -m guest`` with ``scripts/`` on the path; the tests
import it the same way (tests/guest/conftest.py).

Modules, lowest first; each imports only modules above it:

- ``cpio``, ``modules``, ``serial``, ``qmp``: the initramfs archive format, kernel modules'
  dependencies, the guest's serial console lines, a QMP client;
- ``image``: the kernel and initramfs from Debian's packages, cached;
- ``netns``: a network namespace with the tap device and the UDP peer the guest talks to;
- ``harness``: QEMU started with the image, its disks and tap, the serial log read;
- ``__main__``: the command line.

Besides these, ``init.sh`` (the guest's ``/init``) and ``pbguest.c`` (the loop itself).
"""
