"""Replica and supervisor logs: rotation by size, and reading them back by time (`vdeploy logs --since`).

A replica writes straight into its log file (its stdout and stderr are the file), so rotation is copy-then-truncate,
as logrotate's copytruncate: `rev1-replica0.log` is copied to `.1` (older copies move up to `.KEEP`) and emptied in
place; the replica's appends land at the new end. A line written between the copy and the truncation is lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

MAX_BYTES = int(os.environ.get("VDEPLOY_LOG_MAX_BYTES", 64 << 20))
KEEP = 3
# Lines that carry their time: Python logging's "2026-12-07 21:37:41,123", ours "--- vdeploy 2026-12-07T21:37:41",
# and JSON lines with "time": "2026-12-07T21:37:41...".
_STAMP = re.compile(r'(?:^|^--- vdeploy |^\{"time": ")(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})')


def rotated(path: Path, keep: int = KEEP) -> list[Path]:
    """The rotated copies of `path` that exist, oldest first."""
    return [p for p in (path.with_name(f"{path.name}.{n}") for n in range(keep, 0, -1)) if p.exists()]


def rotate_if_large(path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> bool:
    """Rotate `path` when it has grown past `max_bytes`; True when it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True


def line_time(line: str) -> datetime | None:
    match = _STAMP.match(line)
    return datetime.fromisoformat(f"{match[1]}T{match[2]}") if match else None


def lines_since(lines: Iterator[str], since: datetime) -> Iterator[str]:
    """The lines from the first one stamped at or after `since` (unstamped lines go with the stamped line before)."""
    started = False
    for line in lines:
        stamp = line_time(line)
        if stamp is not None:
            started = started or stamp >= since
        if started:
            yield line


class JsonLines(logging.Formatter):
    """VDEPLOY_LOG_FORMAT=json: one JSON object a line for log collectors. The engine's twin is in
    vdeploy_engine/server/launch.py (the two share no code but the EngineConfig contract); keep their keys equal."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
