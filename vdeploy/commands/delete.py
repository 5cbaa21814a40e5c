"""`vdeploy delete NAME`: stop the deployment's supervisor (which drains and stops its replicas) and remove its state."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time

STOP_TIMEOUT_S = 90.0  # the supervisor drains requests (up to 60 s) and stops replicas (10 s grace) first


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("delete", help="stop a deployment and remove its state", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--keep-state", action="store_true", help="stop everything but keep revisions and logs")
    parser.set_defaults(func=run)


def stop(deployment, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop the supervisor gracefully (SIGTERM, SIGKILL after `timeout`), then any replica it left behind."""
    from vdeploy.supervisor import stop_process_group

    status = deployment.status()
    pid = status.get("supervisor_pid")
    if deployment.supervisor_alive() and pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while deployment.supervisor_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if deployment.supervisor_alive():
            os.kill(pid, signal.SIGKILL)
            while deployment.supervisor_alive():
                time.sleep(0.05)
    for replica in status.get("replicas", []):  # only if the supervisor could not stop them itself
        if replica.get("pid") and replica.get("create_time"):
            stop_process_group(replica["pid"], create_time=replica["create_time"])


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import Deployment, StateError

    try:
        deployment = Deployment(args.name)
        if not deployment.exists():
            print(f"delete: no deployment named {args.name!r}", file=sys.stderr)
            return 1
        stop(deployment)
    except (StateError, ProcessLookupError) as e:
        print(f"delete: {e}", file=sys.stderr)
        return 1
    if not args.keep_state:
        shutil.rmtree(deployment.dir)
    print(f"{args.name}: deleted")
    return 0
