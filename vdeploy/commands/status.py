"""`vdeploy status [NAME]`: revision, replicas ready/desired, restarts, URL, memory and last error of deployments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="show deployments and their replicas", description=__doc__)
    parser.add_argument("name", nargs="?", help="one deployment (default: all)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def describe(deployment) -> dict[str, Any]:
    """What `status` shows for one deployment, from its status file and live process facts."""
    import psutil

    status = deployment.status()
    alive = deployment.supervisor_alive()
    replicas = []
    for replica in status.get("replicas", []) if alive else []:
        replica = dict(replica)
        replica["rss_bytes"] = _tree_rss(psutil, replica.get("pid"))
        replicas.append(replica)
    serving = status.get("revision")
    desired = 0
    if serving is not None:
        desired = int(deployment.plan(serving).get("replicas", 1))
    rollout = status.get("rollout") or {}
    # The newest error of all is the one shown: an old crash must not hide the failure of today.
    errors = [(r.get("last_error_at") or 0, r["last_error"]) for r in replicas if r.get("last_error")]
    if rollout.get("phase") == "failed":
        errors.append((rollout.get("finished_at") or 0, f"revision {rollout['revision']} failed: {rollout.get('reason')}"))
    return {
        "name": deployment.name,
        "running": alive,
        "url": status.get("url") if alive else None,
        "revision": serving if alive else None,
        "ready": sum(r["state"] == "ready" and r["revision"] == serving for r in replicas),
        "desired": desired if alive else 0,
        "restarts": sum(r.get("restarts", 0) for r in replicas),
        "crash_loop": any(r.get("crash_loop") for r in replicas),
        "memory_bytes": sum(r["rss_bytes"] or 0 for r in replicas),
        "rollout": rollout,
        "last_error": status.get("error") or (max(errors)[1] if errors else None),
        "replicas": replicas,
    }


def _tree_rss(psutil, pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return None


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import Deployment, StateError, list_deployments

    try:
        if args.name:
            deployment = Deployment.existing(args.name)
            deployments = [deployment]
        else:
            deployments = list_deployments()
        rows = [describe(d) for d in deployments]
    except StateError as e:
        print(f"status: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(rows if not args.name else rows[0], indent=2))
        return 0
    if not rows:
        print("no deployments")
        return 0
    width = max(len("NAME"), *(len(row["name"]) for row in rows))
    print(f"{'NAME':{width}} {'REVISION':>8} {'READY':>6} {'RESTARTS':>8} {'MEMORY':>9}  {'URL':26} LAST ERROR")
    for row in rows:
        revision = "-" if row["revision"] is None else str(row["revision"])
        restarts = f"{row['restarts']}{' (crash loop)' if row['crash_loop'] else ''}"
        memory = f"{row['memory_bytes'] / 2**20:.0f}MiB" if row["memory_bytes"] else "-"
        url = row["url"] or "(stopped)"
        print(
            f"{row['name']:{width}} {revision:>8} {row['ready']:>3}/{row['desired']:<2} {restarts:>8} {memory:>9}  "
            f"{url:26} {row['last_error'] or ''}"
        )
    if args.name:
        row = rows[0]
        rollout = row["rollout"]
        if rollout:
            line = f"rollout: revision {rollout.get('revision')} {rollout.get('phase')}"
            if rollout.get("strategy"):
                line += f" ({rollout['strategy']})"
            print(line + (f": {rollout['reason']}" if rollout.get("reason") else ""))
        for r in row["replicas"]:
            gpus = ",".join(map(str, r["gpus"])) if r.get("gpus") else "cpu"
            print(
                f"  replica {r['index']} rev {r['revision']}: {r['state']} pid {r['pid']} port {r['port']} "
                f"gpus {gpus} restarts {r['restarts']}{' crash loop' if r.get('crash_loop') else ''}"
                + (f" - {r['last_error']}" if r.get("last_error") else "")
            )
    return 0
