"""`vdeploy delete NAME`: stop the deployment's supervisor (which drains and stops its replicas) and remove its state."""

from __future__ import annotations

import argparse
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
    import psutil

    from vdeploy.supervisor import stop_process_group

    status = deployment.status()
    pid = status.get("supervisor_pid")
    if deployment.supervisor_alive() and pid:  # the lock proves the recorded pid is still our supervisor
        try:
            supervisor = psutil.Process(pid)
            supervisor.terminate()
            if not _gone(supervisor, timeout):
                supervisor.kill()
                _gone(supervisor, 10.0)
        except psutil.NoSuchProcess:
            pass
    for replica in status.get("replicas", []):  # only if the supervisor could not stop them itself
        if replica.get("pid") and replica.get("create_time"):
            stop_process_group(replica["pid"], create_time=replica["create_time"])


def _gone(process, timeout: float) -> bool:
    """Wait until `process` has exited (a zombie counts: it is not our child to reap)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import Deployment, StateError

    try:
        deployment = Deployment.existing(args.name)
        with deployment.command_lock("delete"):
            stop(deployment)
            if not args.keep_state:
                deployment.remove()
    except StateError as e:
        print(f"delete: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: deleted")
    return 0
