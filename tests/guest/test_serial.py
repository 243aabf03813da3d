"""scripts/guest/serial.py: the guest's console lines into records and measurements."""

from __future__ import annotations

import pytest

from guest.serial import analyze, parse_line, parse_lines, pause_around

READY = "READY t=4.035827 disks=vda,sda peer=10.78.0.1:7777 block=16384 slots=64 progress_ms=100"
SUMMARY = (
    "SUMMARY t=5.25 iters=52 blk_ok=200 net_ok=51 errors=1 lost=1 late=0 max_gap_ms=851.000"
    " seconds=1.2 reason=stop"
)


def progress(
    seq: int, t: float, *, it: int = 0, errors: int = 0, lost: int = 0, gap: float = 1.5
) -> str:
    return (
        f"PROGRESS seq={seq} t={t:.6f} iter={it} blk_ok={4 * it} net_ok={it} errors={errors} "
        f"lost={lost} late=0 gap_ms={gap:.3f} ok.vda={2 * it} ok.sda={2 * it}"
    )


def test_a_record_is_found_after_a_kernel_message_and_carries_its_fields() -> None:
    rec = parse_line(
        "[   14.09] virtio_net virtio1 eth0: link up " + progress(3, 4.5, it=10), host_t=7.0
    )
    assert rec is not None
    assert (rec.kind, rec.num("seq"), rec.num("t"), rec.fields["ok.sda"], rec.host_t) == (
        "PROGRESS",
        3,
        4.5,
        "20",
        7.0,
    )


def test_an_error_line_keeps_its_domain_and_fields() -> None:
    rec = parse_line("ERROR blk disk=vda slot=17 seq=4113 check=aged kind=garbage offset=0")
    assert rec is not None
    assert (rec.kind, rec.word, rec.fields["disk"], rec.fields["kind"]) == (
        "ERROR",
        "blk",
        "vda",
        "garbage",
    )


@pytest.mark.parametrize(
    "text",
    [
        "[    2.000000] reboot: Power down",
        "PROGRESSIVE seq=1",
        # torn by a kernel message: a PROGRESS line lacking a field is no record
        "PROGRESS seq=4 t=4.4 iter=5 blk_ok=20 net_[  3.1] ata1: SATA link up",
        "PROGRESS seq=4 t=x iter=5 blk_ok=20 net_ok=5 errors=0 lost=0 late=0 gap_ms=1",
    ],
)
def test_lines_without_a_whole_record_are_counted_apart(text: str) -> None:
    assert parse_line(text) is None
    assert parse_lines([text]).other_lines == 1


def test_gaps_on_both_clocks_counters_from_the_summary_and_missing_lines() -> None:
    lines = [
        (10.0, READY),
        (10.1, progress(1, 4.1, it=10)),
        (10.2, progress(2, 4.2, it=20, gap=3.0)),
        # seq 3 was torn: missing; the guest clock jumps 0.9 s, the host's 1.4 s
        (11.6, progress(4, 5.1, it=40, errors=1, gap=850.0)),
        (11.6, "ERROR net seq=33 kind=lost len=100 timeout_ms=1000"),
        (11.7, progress(5, 5.2, it=50, errors=1, lost=1)),
        (11.8, SUMMARY),
    ]
    log = parse_lines(lines)
    ready = log.ready()
    assert ready is not None and ready.fields["disks"] == "vda,sda"
    s = analyze(log)
    assert s.progress_lines == 4
    assert s.missing_seqs == 1
    assert s.longest_gap_s == pytest.approx(0.9)
    assert s.longest_gap_host_s == pytest.approx(1.4)
    assert s.longest_op_gap_ms == 851.0
    counts = (s.iterations, s.blk_ok, s.net_ok, s.errors, s.lost, s.error_lines)
    assert counts == (52, 200, 51, 1, 1, 1)
    assert s.ops == 251
    assert s.seconds == pytest.approx(1.1)


def test_without_host_times_only_the_guest_clock_is_measured() -> None:
    s = analyze(parse_lines([progress(1, 1.0, it=1), progress(2, 1.3, it=2)]))
    assert s.longest_gap_host_s is None
    assert s.longest_gap_s == pytest.approx(0.3)
    # no SUMMARY: the last PROGRESS line's counters
    assert (s.iterations, s.net_ok) == (2, 2)


def test_an_empty_log_measures_nothing() -> None:
    s = analyze(parse_lines([]))
    assert (s.progress_lines, s.ops, s.longest_gap_s, s.ops_per_s) == (0, 0, 0.0, 0.0)


def test_the_pause_around_an_operation_is_the_longest_host_interval_it_overlaps() -> None:
    # The guest's clock runs on evenly (its VM was stopped); the host's shows the pause.
    host = [10.0, 10.1, 10.2, 10.95, 11.05, 11.15, 11.6, 11.7]
    log = parse_lines([(h, progress(i + 1, 4.0 + 0.1 * i)) for i, h in enumerate(host)])
    assert pause_around(log, 10.5, 10.6) == pytest.approx(0.75)  # inside one interval
    assert pause_around(log, 10.15, 11.0) == pytest.approx(0.75)  # over several
    assert pause_around(log, 11.1, 11.2) == pytest.approx(0.45)  # ends in a longer one
    assert pause_around(log, 10.0, 10.05) == pytest.approx(0.1)
    assert pause_around(log, 12.0, 12.5) is None  # nothing read after it yet
    assert pause_around(parse_lines([progress(1, 1.0), progress(2, 1.1)]), 0, 9) is None
