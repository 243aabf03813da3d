"""The guest's serial console read back: lines into records, records into measurements.

The guest (``pbguest.c``, ``init.sh``) prints one line per event, a kind word and
``key=value`` fields::

    INIT start t=2.88 kernel=6.1.0-57-amd64
    READY t=4.035827 disks=vda,sda peer=10.78.0.1:7777 block=16384 slots=64 progress_ms=100
    PROGRESS seq=3 t=4.339787 iter=100 blk_ok=272 net_ok=100 errors=0 lost=0 late=0
             gap_ms=3.369 ok.vda=136 ok.sda=136                  (one line)
    ERROR blk disk=vda slot=17 seq=4113 check=aged kind=garbage offset=0 head=...
    SUMMARY t=14.03 iters=2424 blk_ok=9568 net_ok=2424 errors=0 lost=0 late=0 max_gap_ms=13.861 ...

``t`` is the guest's monotonic clock in seconds. The kernel may print onto the same console,
so a record is found anywhere in a line; a line torn by a kernel message is skipped, and
the counters of the next PROGRESS line still count what it said. A reader that stamps each
line with the host's clock (the harness does) lets gaps be measured on both clocks; a plain
log file (libvirt's) gives the guest's clock alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "KINDS",
    "GuestLog",
    "Record",
    "Stats",
    "analyze",
    "host_gaps",
    "parse_line",
    "parse_lines",
    "pause_around",
]

KINDS = ("INIT", "READY", "PROGRESS", "ERROR", "SUMMARY")
_RECORD = re.compile(r"\b(INIT|READY|PROGRESS|ERROR|SUMMARY)\b(.*)$")
_FIELD = re.compile(r"(?<!\S)([A-Za-z_][\w.]*)=(\S*)")
# The fields every PROGRESS line carries, as numbers.
PROGRESS_FIELDS = ("seq", "t", "iter", "blk_ok", "net_ok", "errors", "lost", "late", "gap_ms")


@dataclass(frozen=True)
class Record:
    """One line of the guest: its kind, its fields, the first word after the kind (an
    ERROR's domain: ``blk``, ``net``, ``setup``, ``init``), the host's time it was read
    (``time.monotonic()``, None from a file), and the text."""

    kind: str
    fields: dict[str, str]
    word: str
    host_t: float | None
    text: str

    def num(self, key: str) -> float:
        """Returns field ``key`` as a number (KeyError when absent, ValueError when not one)."""
        return float(self.fields[key])


def parse_line(text: str, host_t: float | None = None) -> Record | None:
    """Returns the record in ``text``, or None when it holds none (kernel messages) or a
    PROGRESS line lacks one of its fields (torn by another writer)."""
    m = _RECORD.search(text.rstrip("\r\n"))
    if not m:
        return None
    kind, rest = m.group(1), m.group(2)
    fields = dict(_FIELD.findall(rest))
    words = rest.split()
    word = words[0] if words and "=" not in words[0] else ""
    if kind == "PROGRESS":
        try:
            for key in PROGRESS_FIELDS:
                float(fields[key])
        except (KeyError, ValueError):
            return None
    return Record(kind, fields, word, host_t, m.group(0))


def parse_lines(lines: Iterable[str | tuple[float, str]]) -> GuestLog:
    """Returns the log of ``lines``: texts, or (host time, text) pairs."""
    log = GuestLog()
    for item in lines:
        host_t, text = item if isinstance(item, tuple) else (None, item)
        log.add(text, host_t)
    return log


@dataclass
class GuestLog:
    """Every record read so far, in order, and the count of lines that held none."""

    records: list[Record] = field(default_factory=list)
    other_lines: int = 0

    def add(self, text: str, host_t: float | None = None) -> Record | None:
        rec = parse_line(text, host_t)
        if rec is None:
            self.other_lines += 1
        else:
            self.records.append(rec)
        return rec

    def of_kind(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    def progress(self) -> list[Record]:
        return self.of_kind("PROGRESS")

    def errors(self) -> list[Record]:
        return self.of_kind("ERROR")

    def ready(self) -> Record | None:
        found = self.of_kind("READY")
        return found[0] if found else None

    def summary(self) -> Record | None:
        found = self.of_kind("SUMMARY")
        return found[-1] if found else None


@dataclass(frozen=True)
class Stats:
    """What a guest log measured.

    ``ops``: verified block reads plus echoed datagrams; ``errors``/``lost``/``late``: the
    guest's own counters (the summary's, else the last PROGRESS line's); ``error_lines``:
    ERROR lines read; ``longest_gap_s``: the longest time between consecutive PROGRESS
    lines on the guest's clock, ``longest_gap_host_s`` on the host's (None without host
    times); ``longest_op_gap_ms``: the longest time between two completed I/O operations
    the guest measured itself; ``missing_seqs``: PROGRESS lines not read (torn or lost);
    ``seconds``: guest time from the first to the last PROGRESS line."""

    progress_lines: int
    iterations: int
    blk_ok: int
    net_ok: int
    errors: int
    lost: int
    late: int
    error_lines: int
    longest_gap_s: float
    longest_gap_host_s: float | None
    longest_op_gap_ms: float
    missing_seqs: int
    seconds: float

    @property
    def ops(self) -> int:
        return self.blk_ok + self.net_ok

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def _longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def analyze(log: GuestLog) -> Stats:
    """Returns the measurements of ``log`` (all zero before the first PROGRESS line)."""
    prog = log.progress()
    summary = log.summary()
    last = summary or (prog[-1] if prog else None)

    def counter(key: str) -> int:
        return int(last.num(key)) if last is not None and key in last.fields else 0

    seqs = [int(r.num("seq")) for r in prog]
    host = [r.host_t for r in prog if r.host_t is not None]
    op_gaps = [r.num("gap_ms") for r in prog]
    if summary is not None and "max_gap_ms" in summary.fields:
        op_gaps.append(summary.num("max_gap_ms"))
    times = [r.num("t") for r in prog]
    return Stats(
        progress_lines=len(prog),
        iterations=counter("iters") or counter("iter"),
        blk_ok=counter("blk_ok"),
        net_ok=counter("net_ok"),
        errors=counter("errors"),
        lost=counter("lost"),
        late=counter("late"),
        error_lines=len(log.errors()),
        longest_gap_s=_longest_gap(times),
        longest_gap_host_s=_longest_gap(host) if len(host) == len(prog) else None,
        longest_op_gap_ms=max(op_gaps, default=0.0),
        missing_seqs=(seqs[-1] - seqs[0] + 1 - len(set(seqs))) if seqs else 0,
        seconds=times[-1] - times[0] if times else 0.0,
    )


def host_gaps(log: GuestLog) -> list[tuple[float, float]]:
    """Returns (start, end) on the host's clock of every interval between consecutive
    PROGRESS lines (lines without a host time are skipped)."""
    times = [r.host_t for r in log.progress() if r.host_t is not None]
    return list(zip(times, times[1:]))


def pause_around(log: GuestLog, start: float, end: float) -> float | None:
    """Returns the longest host-clock interval between consecutive PROGRESS lines that
    overlaps [``start``, ``end``] (host times): the pause the guest's loop shows around
    something done to it in that time; None when no interval overlaps (no PROGRESS line
    after ``start`` read yet).

    The guest's own clock stops while its VM is stopped, so only the host's clock shows
    such a pause."""
    spans = [b - a for a, b in host_gaps(log) if b >= start and a <= end]
    return max(spans) if spans else None
