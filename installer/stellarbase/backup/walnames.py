"""WAL file names, LSNs and timeline histories, as PostgreSQL defines them.

A segment name is 24 hex digits: timeline, then the segment number split into a "log id"
and a segment within it (`TTTTTTTTXXXXXXXXYYYYYYYY`). With the default 16 MiB segments
there are 256 segments per log id. LSNs are written `X/Y` (two hex halves of 64 bits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
_BACKUP_HISTORY = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def is_segment(name: str) -> bool:
    return _SEGMENT.match(name) is not None


def is_partial(name: str) -> bool:
    return _PARTIAL.match(name) is not None


def is_history(name: str) -> bool:
    return _HISTORY.match(name) is not None


def is_backup_history(name: str) -> bool:
    return _BACKUP_HISTORY.match(name) is not None


def is_wal_file(name: str) -> bool:
    """Anything Postgres may hand to archive_command or ask of restore_command."""
    return is_segment(name) or is_partial(name) or is_history(name) or is_backup_history(name)


def parse_lsn(text: str) -> int:
    match = _LSN.match(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r} (expected X/Y in hex, e.g. 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _per_id(segment_size: int) -> int:
    return 0x100000000 // segment_size


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment: ordered by timeline, then position."""

    timeline: int
    number: int  # segment number from the start of WAL: lsn // segment_size

    def name(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
        per_id = _per_id(segment_size)
        return f"{self.timeline:08X}{self.number // per_id:08X}{self.number % per_id:08X}"

    def start_lsn(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return self.number * segment_size

    def next(self) -> Segment:
        return Segment(self.timeline, self.number + 1)


def parse_segment(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
    """`000000010000000000000003` (or its `.partial`) → Segment(1, 3)."""
    match = _SEGMENT.match(name.removesuffix(".partial"))
    if match is None:
        raise ValueError(f"not a WAL segment name: {name!r}")
    tli, log_id, seg = (int(g, 16) for g in match.groups())
    per_id = _per_id(segment_size)
    if seg >= per_id:
        raise ValueError(f"not a WAL segment name for {segment_size}-byte segments: {name!r}")
    return Segment(tli, log_id * per_id + seg)


def segment_of(lsn: int, timeline: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
    """The segment that holds `lsn` on `timeline`."""
    return Segment(timeline, lsn // segment_size)


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def history_timeline(name: str) -> int:
    match = _HISTORY.match(name)
    if match is None:
        raise ValueError(f"not a timeline history file name: {name!r}")
    return int(match.group(1), 16)


@dataclass(frozen=True)
class Switch:
    """One line of a history file: `parent` ended (and its child began) at `lsn`."""

    parent: int
    lsn: int


def parse_history(text: str) -> list[Switch]:
    """The lines of `0000000N.history`, oldest first: `<parent tli>\\t<switch LSN>\\t<reason>`."""
    switches: list[Switch] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"malformed history line: {raw!r}")
        switches.append(Switch(int(fields[0]), parse_lsn(fields[1])))
    return switches


def timeline_spans(target: int, switches: list[Switch]) -> list[tuple[int, int, int | None]]:
    """The WAL path to `target`: (timeline, from LSN, until LSN or None for open end).

    `switches` is the parsed history of `target` (empty for timeline 1). A recovery that
    starts at LSN L on any ancestor follows these spans in order.
    """
    spans: list[tuple[int, int, int | None]] = []
    start = 0
    for switch in switches:
        spans.append((switch.parent, start, switch.lsn))
        start = switch.lsn
    spans.append((target, start, None))
    return spans


def segments_between(
    start_lsn: int,
    end_lsn: int,
    spans: list[tuple[int, int, int | None]],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> list[Segment]:
    """Every segment recovery reads from `start_lsn` up to and including `end_lsn`.

    At a timeline switch inside a segment, PostgreSQL reads the switch segment from the
    new timeline (the old timeline's copy is only needed up to the previous segment).
    """
    wanted: list[Segment] = []
    for tli, span_start, span_end in spans:
        lo = max(start_lsn, span_start)
        hi = end_lsn if span_end is None else min(end_lsn, span_end - 1)
        if hi < lo:
            continue
        first = lo // segment_size
        last = hi // segment_size
        if (
            span_end is not None
            and span_end % segment_size != 0
            and last == span_end // segment_size
        ):
            last -= 1  # the segment holding the switch is read from the child timeline
        wanted.extend(Segment(tli, n) for n in range(first, last + 1))
    return wanted
