"""`vdeploy logs NAME [-f] [--replica N]`: a replica's log (the serving revision's, by default) or the supervisor's."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("logs", help="print a replica's or the supervisor's log", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new output (Ctrl-C stops)")
    parser.add_argument("--replica", type=int, default=0, help="replica index (default 0)")
    parser.add_argument("--revision", type=int, help="revision (default: the serving one, else the newest)")
    parser.add_argument("--supervisor", action="store_true", help="the supervisor's log instead")
    parser.add_argument("--tail", type=int, default=None, help="only the last N lines")
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
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        text = f.read()
        if args.tail is not None:
            text = b"".join(text.splitlines(keepends=True)[-args.tail :])
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
