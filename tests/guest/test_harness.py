"""scripts/guest/harness.py without a guest: the serial console of a migrated guest read
from two QEMUs in turn."""

from __future__ import annotations

import io
from pathlib import Path

from guest.harness import Guest
from guest.image import GuestImage
from guest.serial import analyze

LINE = (
    "PROGRESS seq={} t={} iter=1 blk_ok=2 net_ok=1 errors=0 lost=0 late=0 gap_ms=1.0"
    " ok.vda=1 ok.sda=1\n"
)


def test_a_line_cut_by_the_switchover_is_finished_by_the_next_qemu(tmp_path: Path) -> None:
    image = GuestImage(tmp_path / "k", tmp_path / "i", "6.1", {}, (), "key")
    g = Guest(image, tmp_path)
    g._serial_out = (tmp_path / "serial.log").open("wb")
    first, second, third = LINE.format(1, 1.0), LINE.format(2, 1.1), LINE.format(3, 1.2)
    cut = len(second) // 2
    # The source stopped halfway through line 2; the destination prints the rest.
    g._read_serial(io.BytesIO((first + second[:cut]).encode()), None)
    g._read_serial(io.BytesIO((second[cut:] + third).encode()), None)
    g._serial_out.close()
    s = analyze(g.log)
    assert (s.progress_lines, s.missing_seqs, g.log.other_lines) == (3, 0, 0)
    assert (tmp_path / "serial.log").read_text() == first + second + third
