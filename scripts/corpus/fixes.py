"""The corpus: real security fixes of Debian bookworm source packages, one entry per fix.

Each entry names the package version, the fix (a patch of debian/patches, or for QEMU the
files and hunks of an upstream stable release diff), what the fix changes (its *shape*,
decided by reading the fix, not by patchbox) and the probe that shows the fix live.

Shapes (docs/corpus.md, "Counting"):

- ``function``: the fix changes code only, and that code runs again in the live process
  (a request handler, a parser): a live patch can fix the running program;
- ``data``: the fix changes the layout or the size of data the running program already
  holds (a struct member, an array size, an initialised object): code replacement alone
  cannot do it, patchbox should refuse;
- ``init``: code only, but code the running process never runs again (it ran at start-up,
  or its loop is ``main``'s, or it runs in a process without the agent): a patch may apply,
  yet it is not a working live patch;
- ``elsewhere``: the fix is in code of another program of the tree (a client, a helper),
  not linked into the daemon: "the diff changes no function" is the right answer;
- ``absent``: the fix is in code the corpus build does not compile (a QEMU device outside
  the corpus configuration).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Fix", "Package", "PACKAGES", "get_package", "key"]


@dataclass(frozen=True)
class Fix:
    """One fix of the corpus."""

    ident: str  # CVE id(s) or the patch name
    patch: str  # debian/patches/NAME, or for QEMU the release diff (v7.2.N.diff)
    shape: str  # function | data | init | elsewhere | absent
    what: str  # file: function(s), one line
    probe: str | None = None  # a key of its program module's PROBES; None: no probe
    files: tuple[str, ...] = ()  # QEMU: the files of the release diff that are this fix
    hunks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # QEMU: file -> hunk numbers
    ci: bool = False  # part of the CI subset (tests/corpus, -m corpus)
    note: str = ""
    # Why nothing in the corpus run calls the fixed code (QEMU: a device only a guest
    # driver reaches); such a fix, built, applied and removed cleanly, is ``unexercised``,
    # not ``live``, unless a probe shows the fixed code at work.
    unexercised: str = ""


def key(fix: Fix) -> str:
    """Returns the fix's short name: the patch file's stem, or the CVE id for QEMU."""
    if fix.patch.endswith(".diff"):
        return fix.ident.split()[0]
    return re.sub(r"\.(patch|diff)$", "", fix.patch)


@dataclass(frozen=True)
class Package:
    """A Debian source package and the fixes taken from it."""

    name: str
    version: str
    fixes: tuple[Fix, ...]


DNSMASQ = Package(
    "dnsmasq",
    "2.90-4~deb12u2",
    (
        Fix(
            "CVE-2026-2291",
            "CVE-2026-2291.patch",
            "data",
            "dnsmasq.h: union bigname 1025 -> 2051 bytes (heap objects, a freelist)",
            note="old 1025-byte bignames on the freelist would be reused by new code",
        ),
        Fix(
            "CVE-2026-4890",
            "CVE-2026-4890.patch",
            "function",
            "dnssec.c: prove_non_existence_nsec, prove_non_existence_nsec3 (NSEC bitmap loop)",
        ),
        Fix(
            "CVE-2026-4891",
            "CVE-2026-4891.patch",
            "function",
            "dnssec.c: validate_rrset (RRSIG rdlen too small)",
        ),
        Fix(
            "CVE-2026-4892",
            "CVE-2026-4892.patch",
            "init",
            "helper.c: create_helper (DHCPv6 CLID into the helper's buffer)",
            note="create_helper runs once at start-up; its loop runs for ever in the forked "
            "script helper, a process without the agent",
        ),
        Fix(
            "CVE-2026-4893",
            "CVE-2026-4893.patch",
            "function",
            "forward.c: process_reply (EDNS client subnet check length)",
            probe="dnsmasq_ecs",
            ci=True,
        ),
        Fix(
            "CVE-2026-5172",
            "CVE-2026-5172.patch",
            "function",
            "rfc1035.c: extract_addresses (rdlen shorter than the record)",
            probe="dnsmasq_mx_rdlen",
        ),
    ),
)

MEMCACHED = Package(
    "memcached",
    "1.6.18-1+deb12u1",
    (
        Fix(
            "CVE-2026-47783 CVE-2026-47784",
            "0008-CVE-2026-47783-CVE-2026-47784.patch",
            "function",
            "sasl_defs.c: sasl_server_userdb_checkpass (constant-time compare, no early break)",
            probe="memcached_sasl_dup_user",
            ci=True,
        ),
        Fix(
            "CVE-2023-46852",
            "0009-CVE-2023-46852.patch",
            "function",
            "proto_proxy.c: proxy_process_command (multiget prefix into a stack buffer)",
            probe="memcached_proxy_long_get",
            ci=True,
        ),
        Fix(
            "CVE-2023-46853",
            "CVE-2023-46853.patch",
            "data",
            "proxy.h: struct mcp_parser_s gains endlen (mid-struct); proxy_request.c: 4 functions",
            probe="memcached_proxy_bare_newline",
            ci=True,
            note="adapted by hand with a shadow variable: docs/shadow.md",
        ),
    ),
)

# OpenSSH: every security fix of the series (the CVE-* patches and the four fixes named
# otherwise), built against sshd. Most are client fixes: the right answer for sshd is
# "changes no function".
_SSH = [
    ("CVE-2023-38408", "CVE-2023-38408-1.patch", "elsewhere", "ssh-pkcs11.c (pkcs11 helper)"),
    ("CVE-2023-38408", "CVE-2023-38408-2.patch", "elsewhere", "ssh-agent.c (ssh-agent)"),
    (
        "CVE-2023-38408",
        "CVE-2023-38408-3.patch",
        "elsewhere",
        "misc.c/h, ssh-pkcs11.c, ssh-sk.c (helpers; misc.c's new code unused by sshd)",
    ),
    (
        "CVE-2023-28531",
        "CVE-2023-28531.patch",
        "elsewhere",
        "authfd.c: ssh_update_card (ssh-add; linked into sshd, never called)",
    ),
    (
        "CVE-2023-48795",
        "CVE-2023-48795.patch",
        "data",
        "kex.c/h, packet.c, sshd.c (Terrapin): struct kex gains kex_strict; main's kex",
    ),
    ("CVE-2023-51384", "CVE-2023-51384.patch", "elsewhere", "ssh-agent.c (ssh-agent)"),
    ("CVE-2023-51385", "CVE-2023-51385.patch", "elsewhere", "ssh.c (client)"),
    (
        "CVE-2024-6387",
        "Disable-async-signal-unsafe-code-from-the-sshsigdie-.patch",
        "function",
        "log.c: sshsigdie (regreSSHion: no syslog from the SIGALRM handler)",
    ),
    ("CVE-2025-26465", "CVE-2025-26465.patch", "elsewhere", "sshconnect2.c (client)"),
    (
        "incorrect-return-values",
        "incorrect-return-values.patch",
        "elsewhere",
        "krl.c, ssh-agent.c, ssh-sk-client.c, sshconnect2.c, sshsig.c (not sshd's code paths)",
    ),
    (
        "CVE-2025-32728",
        "fix-disable-forwarding.patch",
        "function",
        "session.c: DisableForwarding also disables X11 and agent forwarding",
    ),
    ("CVE-2025-61984", "CVE-2025-61984.patch", "elsewhere", "ssh.c (client)"),
    (
        "CVE-2025-61985",
        "CVE-2025-61985.patch",
        "elsewhere",
        "misc.c: urldecode (ssh:// URIs, client; linked into sshd, never called)",
    ),
    ("CVE-2025-61984", "CVE-2025-61984-tests.patch", "elsewhere", "regress/percent.sh (test)"),
    ("CVE-2026-35388", "CVE-2026-35388.patch", "elsewhere", "mux.c (client)"),
    ("CVE-2026-35385", "CVE-2026-35385.patch", "elsewhere", "scp.c"),
    (
        "CVE-2026-35387",
        "CVE-2026-35387.patch",
        "function",
        "auth2-hostbased.c, auth2-pubkey.c: key type checked against the signature algorithm",
    ),
    (
        "CVE-2026-35414",
        "CVE-2026-35414.patch",
        "function",
        "auth2-pubkeyfile.c: principals with a comma in certificates",
    ),
    ("prohibit-comma", "prohibit-comma-in-hostnames.patch", "elsewhere", "ssh.c (client)"),
    ("CVE-2026-35386", "CVE-2026-35386-1.patch", "elsewhere", "readconf.c/h, ssh.c (client)"),
    ("CVE-2026-35386", "CVE-2026-35386-2.patch", "elsewhere", "ssh.c (client)"),
    ("CVE-2026-35386", "CVE-2026-35386-3.patch", "elsewhere", "regress/percent.sh (test)"),
]
_SSH_PROBES = {
    "Disable-async-signal-unsafe-code-from-the-sshsigdie-.patch": "sshd_grace_alarm",
    "fix-disable-forwarding.patch": "sshd_disable_forwarding",
    "CVE-2026-35414.patch": "sshd_comma_principal",
}
OPENSSH = Package(
    "openssh",
    "1:9.2p1-2+deb12u10",
    tuple(Fix(i, p, s, w, probe=_SSH_PROBES.get(p)) for i, p, s, w in _SSH),
)

# QEMU 7.2: the CVE fixes named by debian/changelog in the stable release diffs
# (debian/patches/v7.2.N.diff). ``files`` are the diff's sections that hold the fix;
# ``hunks`` pick the fix's hunks where a section also carries other commits of the
# release (their changelog lines name them). The corpus's QEMU is built with Debian's
# qemu-system-x86 device set (scripts/qemu/build-qemu.sh), so every fix below is code
# compiled into qemu-system-x86_64.
QEMU = Package(
    "qemu",
    "1:7.2+dfsg-7+deb12u18",
    (
        Fix(
            "CVE-2023-0330",
            "v7.2.3.diff",
            "function",
            "hw/scsi/lsi53c895a.c: lsi_execute_script (a static reentrancy counter)",
            files=("hw/scsi/lsi53c895a.c",),
            probe="qemu_lsi_dma_reentrancy",
        ),
        Fix(
            "CVE-2023-2861",
            "v7.2.4.diff",
            "function",
            "hw/9pfs/9p-util.h: openat_file refuses special files (static inline, in the "
            "9p objects' open paths)",
            files=("hw/9pfs/9p-util.h",),
            probe="qemu_9p_special_file",
        ),
        Fix(
            "CVE-2023-3301",
            "v7.2.4.diff",
            "function",
            "net/vhost-vdpa.c: vhost_vdpa_cleanup keeps a peer NIC's state (netdev_del)",
            files=("net/vhost-vdpa.c",),
            hunks={"net/vhost-vdpa.c": (2,)},  # 1: _F_CTRL_GUEST_OFFLOADS, 3: CVQ buffer
            unexercised="netdev_add of a vhost-vdpa netdev needs a vDPA device "
            "(/dev/vhost-vdpa-N); this machine's kernel (6.18, CONFIG_VDPA not set, "
            "CONFIG_MODULES not set: no vdpa_sim_net to load) has no vdpa bus, and "
            "`vdpa mgmtdev show` finds no vdpa netlink family",
        ),
        Fix(
            "CVE-2023-3255",
            "v7.2.5.diff",
            "function",
            "ui/vnc-clipboard.c: inflate_buffer (endless loop on data after the zlib stream)",
            files=("ui/vnc-clipboard.c",),
            probe="qemu_vnc_clipboard_trailing",
        ),
        Fix(
            "CVE-2023-3354",
            "v7.2.5.diff",
            "data",
            "include/io/channel-tls.h: struct QIOChannelTLS gains hs_ioc_tag; "
            "io/channel-tls.c: the handshake's watch removed on close",
            files=("include/io/channel-tls.h", "io/channel-tls.c"),
        ),
        Fix(
            "CVE-2023-3180",
            "v7.2.5.diff",
            "function",
            "hw/virtio/virtio-crypto.c: virtio_crypto_sym_op_helper (src_len != dst_len)",
            files=("hw/virtio/virtio-crypto.c",),
            probe="qemu_virtio_crypto_len_mismatch",
        ),
        Fix(
            "CVE-2023-5088",
            "v7.2.7.diff",
            "function",
            "hw/ide/core.c: ide_bus_reset (cancel DMA before the reset)",
            files=("hw/ide/core.c",),
            probe="qemu_ide_reset_pending_dma",
            note="probe: upstream's ahci-test reset/pending_callback over qtest (q35's AHCI, "
            "a throttled write pending at an HBA reset); the load's system_reset also runs "
            "the patched ide_bus_reset",
        ),
        Fix(
            "CVE-2023-42467",
            "v7.2.7.diff",
            "function",
            "hw/scsi/scsi-disk.c: scsi_disk_emulate_mode_select (block size 256)",
            files=("hw/scsi/scsi-disk.c",),
            hunks={"hw/scsi/scsi-disk.c": (1,)},  # 2: FORMAT UNIT terminated
            probe="qemu_scsi_mode_select_256",
        ),
        Fix(
            "CVE-2024-24474",
            "v7.2.7.diff",
            "function",
            "hw/scsi/esp.c: esp_do_nodma (transfer length capped by async_len)",
            files=("hw/scsi/esp.c",),
            hunks={"hw/scsi/esp.c": (1,)},  # 2: sysbus_esp_gpio_demux's type
            probe="qemu_esp_nodma_length",
        ),
        Fix(
            "CVE-2023-3019",
            "v7.2.8.diff",
            "data",
            "include/net/net.h: NetClientState gains reentrancy_guard, qemu_new_nic() a "
            "parameter; net/net.c and 37 NIC models",
            note="a struct member and an API change across 38 files: not carved",
        ),
        Fix(
            "CVE-2023-6693",
            "v7.2.9.diff",
            "function",
            "hw/net/virtio-net.c: virtio_net_flush_tx (the vnet header's stack copy)",
            files=("hw/net/virtio-net.c",),
            unexercised="no observable effect on this build: the unfixed copy of a 20-byte "
            "header (HASH_REPORT, a tap peer with vnet_hdr) into the 12-byte mhdr writes "
            "its 8 last bytes into sg[0].iov_base (mhdr at rsp+0x24, sg at rsp+0x30), dead "
            "there; frames go out from the guest's buffers (no header swap on x86): the tap "
            "peer gets the same frame from the level and the fixed QEMU",
        ),
        Fix(
            "CVE-2023-6683",
            "v7.2.10.diff",
            "function",
            "ui/clipboard.c: qemu_clipboard_set_data (empty data is not available), "
            "qemu_clipboard_update/request asserts",
            files=("ui/clipboard.c",),
            probe="qemu_vnc_clipboard_empty",
        ),
        Fix(
            "CVE-2024-3446",
            "v7.2.11.diff",
            "init",
            "hw/virtio/virtio.c: virtio_bh_new_guarded; *_realize of virtio-serial/-gpu/-crypto "
            "(guarded BHs only for devices realized after the fix)",
            files=(
                "hw/virtio/virtio.c",
                "include/hw/virtio/virtio.h",
                "hw/char/virtio-serial-bus.c",
                "hw/display/virtio-gpu.c",
                "hw/virtio/virtio-crypto.c",
            ),
            hunks={"hw/virtio/virtio.c": (2,)},  # 1: packed virtqueue flush used_idx
            probe="qemu_virtio_serial_hotplug",
        ),
        Fix(
            "CVE-2024-3447",
            "v7.2.11.diff",
            "function",
            "hw/sd/sdhci.c: sdhci_write (no TRNMOD while DAT inhibit), dataport asserts",
            files=("hw/sd/sdhci.c",),
            probe="qemu_sdhci_trnmod_inhibit",
        ),
        Fix(
            "CVE-2024-26327 CVE-2024-26328",
            "v7.2.11.diff",
            "function",
            "hw/pci/pcie_sriov.c: register_vfs checks NumVFs, new pcie_sriov_num_vfs; "
            "hw/nvme/ctrl.c: nvme_pci_write_config uses it",
            files=("hw/pci/pcie_sriov.c", "include/hw/pci/pcie_sriov.h", "hw/nvme/ctrl.c"),
            hunks={"hw/nvme/ctrl.c": (15,)},  # 1-14: msix-exclusive-bar, serial, errors
            probe="qemu_nvme_sriov_numvfs",
        ),
        Fix(
            "CVE-2024-4467",
            "v7.2.13.diff",
            "function",
            "block.c: bdrv_open_child* gain parse_filename (static signatures); qcow2.c",
            files=("block.c", "block/qcow2.c"),
            probe="qemu_qcow2_json_data_file",
            note="qcow2_do_open's half matters to qemu-img (tools not configured)",
        ),
        Fix(
            "CVE-2024-7409",
            "v7.2.14.diff",
            "data",
            "nbd/server.c, blockdev-nbd.c: NBDClient, NBDServerData gain fields; a trace point",
            files=(
                "blockdev-nbd.c",
                "nbd/server.c",
                "include/block/nbd.h",
                "block/monitor/block-hmp-cmds.c",
                "qemu-nbd.c",
                "nbd/trace-events",
            ),
            probe="qemu_nbd_idle",
        ),
        Fix(
            "CVE-2025-11234",
            "v7.2.22.diff",
            "data",
            "io/channel-websock.c: struct QIOChannelWebsock gains hs_io_tag (TypeInfo size)",
            files=("io/channel-websock.c", "include/io/channel-websock.h"),
        ),
    ),
)

PACKAGES = {p.name: p for p in (DNSMASQ, MEMCACHED, OPENSSH, QEMU)}


def get_package(name: str) -> Package:
    """Returns the package of that name (KeyError if the corpus has none)."""
    return PACKAGES[name]
