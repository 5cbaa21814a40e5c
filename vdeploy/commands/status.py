"""`vdeploy status [NAME]`: revision, replicas ready/desired, restarts, URL, memory and last error of deployments.

With a NAME, each ready replica's memory is shown component by component: the plan's prediction beside what the
replica measured at start-up (read from its /metrics), and its resident set now."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import yaml

from vdeploy.commands.output import add_output_argument

EXAMPLES = """examples:
  vdeploy status                       every deployment, one line each
  vdeploy status quickstart-smollm2-cpu -o wide
  vdeploy status --watch               print again whenever something changes (Ctrl-C stops)
  vdeploy status NAME -o json | jq .ready
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="show deployments and their replicas", description=__doc__,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="one deployment (default: all)")
    add_output_argument(parser)
    parser.add_argument("-w", "--watch", action="store_true",
                        help="keep watching: print the status again each time it changes (Ctrl-C stops)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between looks with --watch (default 1)")
    parser.set_defaults(func=run)


def describe(deployment) -> dict[str, Any]:
    """What `status` shows for one deployment, from its status file and live process facts."""
    import psutil

    status = deployment.status()
    alive = deployment.supervisor_alive()
    # A supervisor that stops writes its pid as null; one still recorded but gone was killed, and nothing stopped
    # the deployment on purpose: it is still wanted, and nothing serves it.
    died = not alive and status.get("supervisor_pid") is not None
    replicas = []
    for replica in status.get("replicas", []) if alive else []:
        replica = dict(replica)
        replica["rss_bytes"] = _tree_rss(psutil, replica.get("pid"))
        replica["memory"] = _replica_memory(replica) if replica.get("state") == "ready" else None
        replicas.append(replica)
    serving = status.get("revision")
    plan = deployment.plan(serving) if serving is not None else {}
    desired = int(plan.get("replicas", 1)) if plan else 0
    rollout = status.get("rollout") or {}
    # The newest error of all is the one shown: an old crash must not hide the failure of today.
    errors = [(r.get("last_error_at") or 0, r["last_error"]) for r in replicas if r.get("last_error")]
    if rollout.get("phase") == "failed":
        errors.append((rollout.get("finished_at") or 0, f"revision {rollout['revision']} failed: {rollout.get('reason')}"))
    if died:
        errors.append((time.time(), _died(status)))
    return {
        "name": deployment.name,
        "model": plan["engine"]["model"] if plan and alive else None,
        "running": alive,
        "url": status.get("url") if alive else None,
        "revision": serving if alive else None,
        "ready": sum(r["state"] == "ready" and r["revision"] == serving for r in replicas),
        "desired": desired if alive or died else 0,
        "restarts": sum(r.get("restarts", 0) for r in replicas),
        "crash_loop": any(r.get("crash_loop") for r in replicas),
        "memory_bytes": sum(r["rss_bytes"] or 0 for r in replicas),
        "rollout": rollout,
        "last_error": status.get("error") or (max(errors)[1] if errors else None),
        "replicas": replicas,
    }


def _died(status: dict[str, Any]) -> str:
    return (
        f"the supervisor (pid {status['supervisor_pid']}) is gone without stopping the deployment (killed?); "
        "`vdeploy apply` starts it again"
    )


def _tree_rss(psutil, pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return None


_MEMORY_METRICS = {"vdeploy:memory_predicted_bytes": "predicted", "vdeploy:memory_measured_bytes": "measured"}


def _replica_memory(replica: dict[str, Any]) -> dict[str, dict[str, int]] | None:
    """{"predicted": {component: bytes}, "measured": {...}} from the replica's /metrics; None if it does not answer."""
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{replica['port']}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    memory: dict[str, dict[str, int]] = {"predicted": {}, "measured": {}}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in _MEMORY_METRICS:
            component = rest.split('component="', 1)[1].split('"', 1)[0]
            memory[_MEMORY_METRICS[name]][component] = int(float(line.rsplit(" ", 1)[1]))
    return memory


def _memory_lines(replica: dict[str, Any]) -> list[str]:
    """The replica's predicted vs measured table, in MiB, and its resident set against the predicted total."""
    memory = replica.get("memory")
    if not memory or not memory["measured"]:
        return []
    predicted, measured = memory["predicted"], memory["measured"]
    lines = [f"    {'memory MiB':12} {'predicted':>10} {'measured':>10}"]
    for component, value in measured.items():
        planned = f"{predicted[component] / 2**20:.1f}" if component in predicted else "-"
        lines.append(f"    {component:12} {planned:>10} {value / 2**20:10.1f}")
    total = f"{sum(predicted.values()) / 2**20:.1f}" if predicted else "-"
    lines.append(f"    {'total':12} {total:>10} {sum(measured.values()) / 2**20:10.1f}")
    if replica.get("rss_bytes") and not replica.get("gpus"):
        lines.append(f"    {'resident now':12} {'':>10} {replica['rss_bytes'] / 2**20:10.1f}")
    return lines


def run(args: argparse.Namespace) -> int:
    from vdeploy.state import StateError

    try:
        if not args.watch:
            print(render(collect(args.name), args.name, args.output))
            return 0
        _watch(args)
    except StateError as e:
        print(f"status: {e}", file=sys.stderr)
        return 1
    return 0


def collect(name: str | None) -> list[dict[str, Any]]:
    from vdeploy.state import Deployment, list_deployments

    return [describe(d) for d in ([Deployment.existing(name)] if name else list_deployments())]


def _watch(args: argparse.Namespace) -> None:
    """Print the status each time it changes, as `kubectl get -w` does; on a terminal, redraw it in place instead."""
    redraw = sys.stdout.isatty() and args.output in ("text", "wide")
    shown = None
    try:
        while True:
            text = render(collect(args.name), args.name, args.output)
            if text != shown:
                if redraw:
                    sys.stdout.write("\x1b[H\x1b[2J")  # cursor home, clear screen
                # Piped JSON is a stream of one-line documents, one per change.
                print(json.dumps(json.loads(text)) if args.output == "json" else text, flush=True)
                shown = text
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass


def render(rows: list[dict[str, Any]], name: str | None, output: str) -> str:
    """What `status` prints: JSON/YAML (one object for NAME, else a list), or the table."""
    if output in ("json", "yaml"):
        data = rows[0] if name else rows
        return json.dumps(data, indent=2) if output == "json" else yaml.safe_dump(data, sort_keys=False).rstrip()
    if not rows:
        return "no deployments"
    wide = output == "wide"
    header = ["NAME", "REVISION", "READY", "RESTARTS", "MEMORY", "URL"] + (["ROLLOUT", "MODEL"] if wide else [])
    table = [header + ["LAST ERROR"]]
    for row in rows:
        restarts = f"{row['restarts']}{' (crash loop)' if row['crash_loop'] else ''}"
        memory = f"{row['memory_bytes'] / 2**20:.0f}MiB" if row["memory_bytes"] else "-"
        line = [row["name"], "-" if row["revision"] is None else str(row["revision"]),
                f"{row['ready']}/{row['desired']}", restarts, memory, row["url"] or "(stopped)"]
        if wide:
            line += [_rollout_text(row["rollout"]) or "-", row.get("model") or "-"]
        table.append(line + [row["last_error"] or ""])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {"REVISION", "READY", "RESTARTS", "MEMORY"}
    lines = ["  ".join(cell.rjust(w) if head in right else cell.ljust(w)
                       for head, cell, w in zip(header, line, widths, strict=False)) + "  " + line[-1]
             for line in table]
    lines = [line.rstrip() for line in lines]
    if name:
        row = rows[0]
        if row["rollout"]:
            lines.append("rollout: " + _rollout_text(row["rollout"], reason=True))
        for r in row["replicas"]:
            gpus = ",".join(map(str, r["gpus"])) if r.get("gpus") else "cpu"
            lines.append(
                f"  replica {r['index']} rev {r['revision']}: {r['state']} pid {r['pid']} port {r['port']} "
                f"gpus {gpus} restarts {r['restarts']}{' crash loop' if r.get('crash_loop') else ''}"
                + (f" - {r['last_error']}" if r.get("last_error") else "")
            )
            lines += _memory_lines(r)
    return "\n".join(lines)


def _rollout_text(rollout: dict[str, Any], reason: bool = False) -> str:
    if not rollout:
        return ""
    text = f"revision {rollout.get('revision')} {rollout.get('phase')}"
    if rollout.get("strategy"):
        text += f" ({rollout['strategy']})"
    return text + (f": {rollout['reason']}" if reason and rollout.get("reason") else "")
