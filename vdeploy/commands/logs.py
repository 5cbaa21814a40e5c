"""`vdeploy logs NAME [-f] [--replica N]`: a replica's log (the serving revision's, by default) or the supervisor's.

Logs are rotated by size (VDEPLOY_LOG_MAX_BYTES, default 64 MiB; three older copies kept); --since and --tail read
through the rotated copies too.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from vdeploy.logfiles import lines_since, rotated

EXAMPLES = """examples:
  vdeploy logs quickstart-smollm2-cpu --since 10m
  vdeploy logs NAME --tail 100 -f
  vdeploy logs NAME --supervisor --since 2026-12-07T21:30:00
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("logs", help="print a replica's or the supervisor's log", description=__doc__,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new output (Ctrl-C stops)")
    parser.add_argument("--replica", type=int, default=0, help="replica index (default 0)")
    parser.add_argument("--revision", type=int, help="revision (default: the serving one, else the newest)")
    parser.add_argument("--supervisor", action="store_true", help="the supervisor's log instead")
    parser.add_argument("--tail", type=int, default=None, help="only the last N lines")
    parser.add_argument("--since", help="only lines from this long ago (90s, 10m, 2h) or this time (2026-12-07T21:30:00)")
    parser.set_defaults(func=run)


def log_path(deployment, replica: int, revision: int | None, supervisor: bool) -> Path:
    if supervisor:
        return deployment.supervisor_log
    if revision is None:
        revision = deployment.status().get("revision") or max(deployment.revisions(), default=1)
    return deployment.replica_log(revision, replica)


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import Deployment, StateError

    try:
        deployment = Deployment.existing(args.name)
        path = log_path(deployment, args.replica, args.revision, args.supervisor)
    except StateError as e:
        print(f"logs: {e}", file=sys.stderr)
        return 1
    if not path.exists():
        print(f"logs: no log at {path} (not started yet?)", file=sys.stderr)
        return 1
    try:
        since = _since(args.since)
    except ValueError as e:
        print(f"logs: --since: {e}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        if since is None and args.tail is None:
            text = f.read()
        else:  # through the rotated copies, oldest first
            older = b"".join(p.read_bytes() for p in rotated(path))
            lines = (older + f.read()).decode(errors="replace").splitlines(keepends=True)
            if since is not None:
                lines = list(lines_since(iter(lines), since))
            text = "".join(lines[-args.tail:] if args.tail is not None else lines).encode()
        out.write(text)
        out.flush()
        try:
            while args.follow:  # a restarted replica appends to the same file, so following it sees restarts too
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


def _since(value: str | None) -> datetime | None:
    """A duration back from now, or a local time (the logs' stamps are local)."""
    if value is None:
        return None
    from vdeploy.rollout import parse_duration

    try:
        return datetime.now() - timedelta(seconds=parse_duration(value, default=0.0))
    except ValueError:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is neither a duration (90s, 10m, 2h) nor a time (2026-12-07T21:30:00)") from None
