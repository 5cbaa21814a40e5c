"""`vdeploy rollout status|history|undo NAME`: follow a rollout, list revisions, or go back to an earlier one."""

from __future__ import annotations

import argparse
import math
import sys
import time

from vdeploy.commands.output import add_output_argument, emit

EXAMPLES = """examples:
  vdeploy rollout status NAME                  wait until the latest rollout ends (exit 0 done, 1 failed)
  vdeploy rollout status NAME --timeout 10m    give up after ten minutes (exit 1)
  vdeploy rollout status NAME --no-watch       say where it is now and return (exit 2 while in progress)
  vdeploy rollout history NAME -o wide
  vdeploy rollout undo NAME --to-revision 3
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollout", help="rollout status, history and undo", description=__doc__,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="rollout_action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="wait for the latest rollout to end (exit 0 complete, 1 failed)")
    status.add_argument("name")
    status.add_argument("-w", "--watch", action=argparse.BooleanOptionalAction, default=True,
                        help="wait until the rollout ends (default); --no-watch returns at once, exit 2 if in progress")
    status.add_argument("--timeout", default="0",
                        help="give up after this long (seconds, or 90s, 5m, 1h) with exit 1; 0 waits forever (default)")
    add_output_argument(status, ("text", "json", "yaml"))
    history = actions.add_parser("history", help="the revisions, newest last")
    history.add_argument("name")
    add_output_argument(history)
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
    """Like `kubectl rollout status`: a line each time the rollout moves, until it completes (0) or fails (1)."""
    from vdeploy.rollout import parse_duration, wait_for_rollout

    try:
        timeout = parse_duration(args.timeout, default=0.0) or math.inf
    except ValueError as e:
        print(f"rollout status: --timeout: {e}", file=sys.stderr)
        return 1
    desired, recorded = deployment.desired(), deployment.status().get("rollout")
    if desired is None or not args.watch:  # nothing requested to wait for, or not asked to wait
        if not recorded:
            recorded = {"revision": desired["revision"], "phase": "progressing"} if desired else \
                {"phase": "none", "reason": "no rollout yet"}
        return _report_rollout(deployment, recorded, args.output)
    said = set()
    wanted = int(deployment.plan(desired["revision"]).get("replicas", 1))

    def progress(status: dict) -> None:
        line = _progress_line(deployment.name, status, desired["revision"], wanted)
        if line not in said and args.output == "text":
            said.add(line)
            print(line, flush=True)

    rollout = wait_for_rollout(deployment, desired["generation"], timeout, on_status=progress)
    return _report_rollout(deployment, rollout, args.output)


def _progress_line(name: str, status: dict, revision: int, desired: int) -> str:
    ready = sum(r.get("state") == "ready" for r in status.get("replicas", []) if r.get("revision") == revision)
    return f"Waiting for {name} revision {revision}: {ready} of {desired} new replicas ready"


def _report_rollout(deployment, rollout: dict, output: str) -> int:
    """The rollout's end (or where it is, with --no-watch); exit 0 complete and serving, 1 failed or degraded."""
    from vdeploy.commands.status import describe

    name, phase = deployment.name, rollout.get("phase")
    code = {"complete": 0, "progressing": 2}.get(phase, 1)
    health = describe(deployment)
    degraded = phase == "complete" and health["ready"] < health["desired"]
    code = 1 if degraded else code
    if output in ("json", "yaml"):
        emit({"name": name, **rollout, "ready": health["ready"], "desired": health["desired"], "exit_code": code},
             output)
        return code
    line = f"{name}: revision {rollout.get('revision')} {phase}" if rollout.get("revision") else f"{name}: {phase}"
    if rollout.get("strategy"):
        line += f" ({rollout['strategy']})"
    if rollout.get("reason"):
        line += f": {rollout['reason']}"
    if degraded:  # rolled out once, not serving now: not "complete"
        line += f", but {health['ready']}/{health['desired']} replicas ready"
        line += f": {health['last_error']}" if health["last_error"] else ""
    print(line)
    return code


def history_rows(deployment) -> list[dict]:
    serving = deployment.status().get("revision") if deployment.supervisor_alive() else None
    rows = []
    for revision in deployment.revisions():
        plan = deployment.plan(revision)
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(deployment.plan_path(revision).stat().st_mtime))
        rows.append({"revision": revision, "created": created, "serving": revision == serving, "model":
                     plan["engine"]["model"], "replicas": plan.get("replicas", 1), "engine": plan["engine"]})
    return rows


def history_text(rows: list[dict], wide: bool) -> str:
    columns = ["replicas", "tensor_parallel_size", "dtype", "max_model_len", "max_num_seqs"]
    if wide:
        columns += ["quantization", "gpu_memory_utilization", "max_num_batched_tokens", "enforce_eager", "port"]
    lines = [f"{'REVISION':>8}  {'CREATED':19}  {'MODEL':40}  SETTINGS"]
    for row in rows:
        engine = {**row["engine"], "replicas": row["replicas"]}
        settings = " ".join(f"{c}={engine.get(c)}" for c in columns).replace("tensor_parallel_size", "tp")
        model = row["model"] if wide else row["model"][-40:]
        marker = "  (serving)" if row["serving"] else ""
        lines.append(f"{row['revision']:>8}  {row['created']:19}  {model:40}  {settings}{marker}")
    return "\n".join(lines)


def _history(deployment, args: argparse.Namespace) -> int:
    rows = history_rows(deployment)
    if args.output in ("json", "yaml"):
        emit(rows, args.output)
    else:
        print(history_text(rows, args.output == "wide"))
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
