"""QEMU device probes of virtio devices: virtio-crypto (CVE-2023-3180), virtio-9p
(CVE-2023-2861).

Each probe drives its device through qtest (load/qtest_client.py) on a QEMU started with
its Probe.machine (qemu.py: start_qemu), a minimal virtio driver (load/virtio_qtest.py)
standing in for the guest's.

CVE-2023-6693 (virtio_net_flush_tx) has no probe: see its Fix.unexercised.
"""

from __future__ import annotations

import struct

from .harness import Ctx, Probe
from .load.qtest_client import QTest
from .load.virtio_qtest import NEEDS_RESET, VirtioPci, VirtioTimeout, Virtqueue

__all__ = ["PROBES"]

# --- virtio-crypto (include/standard-headers/linux/virtio_crypto.h) ---------------------

CRYPTO_DEVICE_ID = 0x1054  # modern virtio-crypto
CIPHER_CREATE_SESSION, CIPHER_ENCRYPT = 0x02, 0x00
AES_CBC, OP_ENCRYPT, SYM_OP_CIPHER = 3, 1, 1
CRYPTO_STATUS = {0: "OK", 1: "ERR", 2: "BADMSG", 3: "NOTSUPP", 4: "INVSESS"}


def _create_session_req(key: bytes) -> bytes:
    """Returns a virtio_crypto_op_ctrl_req (72 bytes) creating an AES-CBC encryption
    session with a key of len(key) bytes."""
    header = struct.pack("<IIII", CIPHER_CREATE_SESSION, AES_CBC, 0, 0)
    para = struct.pack("<IIII", AES_CBC, len(key), OP_ENCRYPT, 0).ljust(48, b"\0")
    return header + para + struct.pack("<II", SYM_OP_CIPHER, 0)


def _cipher_req(session: int, iv_len: int, src_len: int, dst_len: int) -> bytes:
    """Returns a virtio_crypto_op_data_req (72 bytes): CIPHER_ENCRYPT in ``session``."""
    header = struct.pack("<IIQII", CIPHER_ENCRYPT, AES_CBC, session, 0, 0)
    para = struct.pack("<IIII", iv_len, src_len, dst_len, 0).ljust(40, b"\0")
    return header + para + struct.pack("<II", SYM_OP_CIPHER, 0)


def _encrypt(dev: VirtioPci, dataq: Virtqueue, session: int, src: bytes, dst_len: int) -> str:
    """Returns what the device did with one encryption of ``src`` into ``dst_len``
    bytes: its status and the first ciphertext bytes, or that it gave no answer."""
    req = _cipher_req(session, 16, len(src), dst_len)
    try:
        done = dataq.request([req, bytes(16), src], [dst_len, 1], timeout=3)
    except VirtioTimeout:
        reset = " (device needs reset)" if dev.status() & NEEDS_RESET else ""
        return "no answer" + reset
    status = CRYPTO_STATUS.get(done.ins[1][0], str(done.ins[1][0]))
    return f"status {status}, dst {done.ins[0][:8].hex()}.."


def _crypto_len_mismatch(ctx: Ctx) -> str:
    """CVE-2023-3180: creates an AES-CBC session (control queue), encrypts 16 bytes with
    dst_len 16 (a control: both QEMUs answer OK), then 16 bytes with dst_len 32
    (src_len != dst_len). Unfixed QEMU encrypts it (status OK: the bytes are copied by
    src_len, the overflow of the CVE takes src_len > dst_len, not sent here); fixed QEMU
    refuses the request (virtio_error "sym request src len is different from dst len":
    no answer, the device marked as needing a reset). No upstream reproducer; the fix is
    upstream's "virtio-crypto: verify src&dst buffer length for sym request"."""
    with QTest(ctx.extra["qtest"]) as qt:
        dev = VirtioPci(qt, CRYPTO_DEVICE_ID)
        dev.start()
        dataq, ctrlq = dev.queue(0), dev.queue(1)
        dev.driver_ok()
        key = bytes(range(16))
        done = ctrlq.request([_create_session_req(key), key], [16], timeout=3)
        session, status = struct.unpack("<QI", done.ins[0][:12])
        if status != 0:
            return f"session refused: status {CRYPTO_STATUS.get(status, status)}"
        src = b"patchbox 3180 ok"
        same = _encrypt(dev, dataq, session, src, len(src))
        longer = _encrypt(dev, dataq, session, src, 2 * len(src))
        return f"src 16/dst 16: {same}; src 16/dst 32: {longer}"


# --- virtio-9p (9P2000.L) ---------------------------------------------------------------

P9_DEVICE_ID = 0x1049  # modern virtio-9p
TVERSION, TATTACH, TWALK, TLOPEN, TCLUNK = 100, 104, 110, 12, 120
RLERROR = 7
NOFID = 0xFFFFFFFF
P9_ERRNO = {2: "ENOENT", 6: "ENXIO", 13: "EACCES", 1: "EPERM"}


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


def _p9(vq: Virtqueue, mtype: int, body: bytes, tag: int = 1) -> tuple[int, bytes]:
    """Returns (type, body) of the answer to one 9P message."""
    msg = struct.pack("<IBH", 7 + len(body), mtype, tag) + body
    done = vq.request([msg], [8192], timeout=5)
    size, rtype, _ = struct.unpack("<IBH", done.ins[0][:7])
    return rtype, done.ins[0][7:size]


def _9p_special_file(ctx: Ctx) -> str:
    """CVE-2023-2861: over a 9p export of the host's /dev (read-only), walks to ``null``
    (a character device) and opens it (Tlopen O_RDONLY). Unfixed QEMU opens the host's
    device node (Rlopen); fixed QEMU refuses special files (Rlerror ENXIO, and logs "9p:
    broken or compromised client detected"). No upstream reproducer; the fix is upstream's
    "9pfs: prevent opening special files (CVE-2023-2861)". The export is the host's /dev
    (always there, read-only): the machine needs no directory made for it."""
    with QTest(ctx.extra["qtest"]) as qt:
        dev = VirtioPci(qt, P9_DEVICE_ID)
        dev.start()
        vq = dev.queue(0)
        dev.driver_ok()
        rtype, body = _p9(vq, TVERSION, struct.pack("<I", 8192) + _s("9P2000.L"), 0xFFFF)
        if rtype != TVERSION + 1:
            return f"Tversion answered {rtype}"
        rtype, body = _p9(
            vq, TATTACH, struct.pack("<II", 0, NOFID) + _s("root") + _s("") + struct.pack("<I", 0)
        )
        if rtype != TATTACH + 1:
            return f"Tattach answered {rtype} {body.hex()}"
        rtype, body = _p9(vq, TWALK, struct.pack("<IIH", 0, 1, 1) + _s("null"))
        if rtype != TWALK + 1:
            return f"Twalk to null answered {rtype} {body.hex()}"
        try:
            rtype, body = _p9(vq, TLOPEN, struct.pack("<II", 1, 0))
        finally:
            _p9(vq, TCLUNK, struct.pack("<I", 1))
            _p9(vq, TCLUNK, struct.pack("<I", 0))
        if rtype == TLOPEN + 1:
            qtype = body[0]
            return f"Tlopen of the device node null: Rlopen (qid type {qtype:#x})"
        if rtype == RLERROR:
            (err,) = struct.unpack("<I", body[:4])
            return f"Tlopen of the device node null: Rlerror {P9_ERRNO.get(err, err)}"
        return f"Tlopen of the device node null: answered {rtype}"


PROBES: dict[str, Probe] = {
    "qemu_virtio_crypto_len_mismatch": Probe(
        _crypto_len_mismatch,
        lambda s: (
            s.startswith("src 16/dst 16: status OK")
            and s.endswith("src 16/dst 32: no answer (device needs reset)")
        ),
        expected="a cipher request with src_len != dst_len is refused (device needs reset)",
        machine=(
            "-machine",
            "pc",
            "-m",
            "64",
            "-object",
            "cryptodev-backend-builtin,id=cryptodev0",
            "-device",
            "virtio-crypto-pci,cryptodev=cryptodev0,vectors=0",
        ),
    ),
    "qemu_9p_special_file": Probe(
        _9p_special_file,
        lambda s: s.endswith("Rlerror ENXIO"),
        expected="Tlopen of a device node is refused (ENXIO)",
        machine=(
            "-machine",
            "pc",
            "-m",
            "64",
            "-fsdev",
            "local,id=fs0,path=/dev,security_model=passthrough,readonly=on",
            "-device",
            "virtio-9p-pci,fsdev=fs0,mount_tag=pbx,disable-legacy=on,vectors=0",
        ),
    ),
}
