"""`vdeploy rollout status|history|undo NAME`: follow a rollout, list revisions, or go back to an earlier one."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollout", help="rollout status, history and undo", description=__doc__)
    actions = parser.add_subparsers(dest="rollout_action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="the latest rollout (exit 0 complete, 1 failed, 2 in progress)")
    status.add_argument("name")
    history = actions.add_parser("history", help="the revisions, newest last")
    history.add_argument("name")
    undo = actions.add_parser("undo", help="roll back to the previous (or a given) revision")
    undo.add_argument("name")
    undo.add_argument("--to-revision", type=int, help="revision to return to (default: the one before the serving)")
    undo.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)
    undo.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: the rollout timeout)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import Deployment, StateError

    try:
        deployment = Deployment.existing(args.name)
        if args.rollout_action == "undo":
            with deployment.command_lock("rollout undo"):
                return _undo(deployment, args)
        return {"status": _status, "history": _history}[args.rollout_action](deployment, args)
    except StateError as e:
        print(f"rollout: {e}", file=sys.stderr)
        return 1


def _status(deployment, args: argparse.Namespace) -> int:
    rollout = deployment.status().get("rollout") or {}
    if not rollout:
        print(f"{deployment.name}: no rollout yet")
        return 1
    from vdeploy.commands.status import describe

    line = f"{deployment.name}: revision {rollout['revision']} {rollout.get('phase')}"
    if rollout.get("strategy"):
        line += f" ({rollout['strategy']})"
    if rollout.get("reason"):
        line += f": {rollout['reason']}"
    health = describe(deployment)
    degraded = rollout.get("phase") == "complete" and health["ready"] < health["desired"]
    if degraded:  # rolled out once, not serving now: not "complete"
        line += f", but {health['ready']}/{health['desired']} replicas ready"
        line += f": {health['last_error']}" if health["last_error"] else ""
    print(line)
    return 1 if degraded else {"complete": 0, "failed": 1}.get(rollout.get("phase"), 2)


def _history(deployment, args: argparse.Namespace) -> int:
    serving = deployment.status().get("revision") if deployment.supervisor_alive() else None
    print(f"{'REVISION':>8}  {'CREATED':19}  {'MODEL':40}  SETTINGS")
    for revision in deployment.revisions():
        plan = deployment.plan(revision)
        engine = plan["engine"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(deployment.plan_path(revision).stat().st_mtime))
        settings = (
            f"replicas={plan.get('replicas', 1)} tp={engine['tensor_parallel_size']} dtype={engine['dtype']} "
            f"max_model_len={engine['max_model_len']} max_num_seqs={engine['max_num_seqs']}"
        )
        marker = "  (serving)" if revision == serving else ""
        print(f"{revision:>8}  {created:19}  {engine['model'][-40:]:40}  {settings}{marker}")
    return 0


def _undo(deployment, args: argparse.Namespace) -> int:
    from vdeploy.rollout import readiness_timeout, wait_for_rollout
    from vdeploy.supervisor import start_detached

    revisions = deployment.revisions()
    serving = deployment.status().get("revision") if deployment.supervisor_alive() else None
    target = args.to_revision
    if target is None:
        earlier = [r for r in revisions if serving is None or r < serving]
        if not earlier:
            print(f"rollout undo: {deployment.name} has no revision before {serving}", file=sys.stderr)
            return 1
        target = earlier[-1]
    if target not in revisions:
        print(f"rollout undo: {deployment.name} has no revision {target} (it has {revisions})", file=sys.stderr)
        return 1
    if target == serving:
        print(f"{deployment.name}: revision {target} is already serving")
        return 0
    generation = deployment.request(target)
    if not deployment.supervisor_alive():
        start_detached(deployment)
    if not args.wait:
        print(f"{deployment.name}: rolling back to revision {target}")
        return 0
    timeout = args.timeout if args.timeout is not None else readiness_timeout(deployment.plan(target)) + 60
    rollout = wait_for_rollout(deployment, generation, timeout)
    if rollout["phase"] == "complete":
        print(f"{deployment.name}: revision {target} serving (rolled back from {serving})")
        return 0
    print(
        f"{deployment.name}: rollback to revision {target} {rollout['phase']}: {rollout.get('reason')}", file=sys.stderr
    )
    return 1
