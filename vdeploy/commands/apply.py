"""`vdeploy apply FILE|DIR`: compile each recipe, compare it with what is serving, and roll out what changed.

Unchanged deployments are not touched (exit 0, safe to run from CI on every push). A changed one gets a new revision
in the state directory; its supervisor (started here when none is running) brings the revision up next to the old one,
switches the router and stops the old replicas. With --wait (the default) apply returns once that is done, and exits 1
with the root cause when the new revision could not start (the old one keeps serving).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from vdeploy.commands.output import add_output_argument
from vdeploy.diagnostics import Diagnostic, format_text, has_errors

FAILED = ("failed", "timeout", "not ready")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="create or update deployments from recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="a recipe file, or a folder of them")
    parser.add_argument("--dry-run", action="store_true", help="show what would change; start nothing")
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until the new revision serves or fails (default: wait)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait (default: the recipe's rollout timeout)"
    )
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="run the supervisor in this process (for systemd or a container); one recipe only",
    )
    add_output_argument(parser, ("text", "json"))
    parser.set_defaults(func=run)


def load_plans(path: str) -> tuple[list[dict[str, Any]], list[Diagnostic]]:
    """Every recipe under `path` compiled to a plan (as JSON data), and all diagnostics found on the way."""
    from vdeploy.commands.lint import expand
    from vdeploy.compiler import plan_recipe
    from vdeploy.recipe import load_recipes

    files, diagnostics = expand([path])
    plans = []
    for file in files:
        for document in load_recipes(file):
            diagnostics += document.diagnostics
            if document.recipe is None:
                continue
            plan, found = plan_recipe(document.recipe, document.source)
            diagnostics += found
            if plan is not None and not has_errors(found):
                plans.append(plan.model_dump(mode="json"))
    return plans, diagnostics


def checked_plans(path: str) -> list[dict[str, Any]] | None:
    """The plans of every recipe under `path`, after printing its warnings and errors; None when any is an error."""
    plans, diagnostics = load_plans(path)
    problems = [d for d in diagnostics if d.severity != "info"]
    if problems:
        print(format_text(problems), file=sys.stderr)
    return None if has_errors(diagnostics) else plans


def run(args: argparse.Namespace) -> int:
    plans = checked_plans(args.path)
    if plans is None:
        print("apply: nothing changed (fix the errors above)", file=sys.stderr)
        return 1
    # Each deployment's command lock is held until its rollout is done (or not waited for), so a second apply of it
    # waits and then compares against what this one rolled out.
    with contextlib.ExitStack() as locks:
        results, foreground = _apply(args, plans, locks)
    if foreground is not None:
        from vdeploy.supervisor import run_foreground

        return run_foreground(foreground)
    return 1 if any(r["action"] in FAILED for r in results) else 0


def _apply(args: argparse.Namespace, plans: list[dict[str, Any]], locks: contextlib.ExitStack):
    from vdeploy.rollout import changes, live_plan, readiness_timeout, wait_for_rollout
    from vdeploy.state import Deployment, StateError

    if args.foreground:
        if len(plans) != 1:
            print(f"apply: --foreground runs one deployment; {args.path} holds {len(plans)}", file=sys.stderr)
            return [{"action": "failed"}], None
        if Deployment(plans[0]["name"]).supervisor_alive():
            print(f"apply: {plans[0]['name']} already has a supervisor; `vdeploy delete` it first", file=sys.stderr)
            return [{"action": "failed"}], None

    results: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Deployment, int]] = []
    for plan in plans:
        try:
            deployment = Deployment(plan["name"])
            result = {"name": plan["name"], "url": f"http://{plan['engine']['host']}:{plan['engine']['port']}"}
            diff = changes(live_plan(deployment), plan)
            if diff and not args.dry_run and not (unavailable := _backend_problem(plan) or _pull_problem(plan, args.output)):
                # A change to make: from here on, under the deployment's lock (compared again: another command may
                # have changed the deployment while this one waited for the lock).
                locks.enter_context(deployment.command_lock("apply", on_wait=_say_waiting(deployment)))
                diff = changes(live_plan(deployment), plan)
            result["changes"] = diff
            if not diff:
                result |= {"action": "unchanged", "revision": deployment.status().get("revision")}
                results.append(result | _readiness_problem(deployment))
                continue
            if args.dry_run:
                results.append({**result, "action": "would roll out"})
                continue
            if unavailable:
                results.append({**result, "action": "failed", "reason": unavailable})
                continue
            revision = deployment.find_revision(plan) or deployment.add_revision(plan)
            generation = deployment.request(revision)
            result |= {"action": "rolling out", "revision": revision, "previous_revision": _serving(deployment)}
            if not args.foreground and not deployment.supervisor_alive():
                from vdeploy.supervisor import start_detached

                start_detached(deployment)
            results.append(result)
            pending.append((result, deployment, generation))
        except (StateError, RuntimeError, OSError) as e:
            results.append({"name": plan["name"], "action": "failed", "reason": str(e)})

    if args.foreground:
        _report(results, args.output)
        return results, None if results[0]["action"] in FAILED else Deployment(plans[0]["name"])

    if args.wait and pending:
        from vdeploy.commands.progress import RolloutProgress

        started = time.monotonic()
        progress = RolloutProgress(args.output)
        for result, deployment, generation in pending:
            plan = deployment.plan(result["revision"])
            timeout = args.timeout if args.timeout is not None else readiness_timeout(plan) + 60
            rollout = wait_for_rollout(
                deployment, generation, max(0.0, timeout - (time.monotonic() - started)),
                on_status=lambda status, d=deployment, r=result["revision"]: progress.update(d.name, status, r),
            )
            result["action"] = {"complete": "rolled out"}.get(rollout["phase"], rollout["phase"])
            result["seconds"] = round(time.monotonic() - started, 2)
            if rollout.get("reason"):
                result["reason"] = rollout["reason"]
            if rollout["phase"] != "complete":
                result["serving_revision"] = deployment.status().get("revision")
        progress.close()
    _report(results, args.output)
    return results, None


def _readiness_problem(deployment) -> dict[str, Any]:
    """For a deployment that needs no rollout: "not ready" and why, when fewer replicas are ready than desired."""
    from vdeploy.commands.status import describe

    health = describe(deployment)
    if health["ready"] >= health["desired"]:
        return {}
    reason = f"{health['ready']}/{health['desired']} replicas ready"
    return {"action": "not ready", "reason": reason + (f": {health['last_error']}" if health["last_error"] else "")}


def _say_waiting(deployment):
    def say(holder: str) -> None:
        print(f"apply: {deployment.name} is being changed by {holder}; waiting for it to finish", file=sys.stderr)

    return say


def _serving(deployment) -> int | None:
    return deployment.status().get("revision") if deployment.supervisor_alive() else None


def _backend_problem(plan: dict[str, Any]) -> str | None:
    from vdeploy.backends import BackendUnavailable, replica_command

    try:
        replica_command(plan, "plan.json", 0)
    except BackendUnavailable as e:
        return str(e)
    return None


def _pull_problem(plan: dict[str, Any], output: str) -> str | None:
    """Fetch the model first (`vdeploy pull`), so a replica's health-checked start does not download it."""
    from vdeploy.commands.progress import PhaseView
    from vdeploy.commands.pull import pull_checked
    from vdeploy.modelinfo import resolve_model
    from vdeploy.pull import PullError, needs_pull

    engine = plan["engine"]
    if plan.get("backend") != "builtin" or not needs_pull(engine["model"]):
        return None
    view = PhaseView(output)
    try:
        planned = resolve_model(engine["model"], engine.get("revision"))[0]
        pull_checked(engine["model"], engine.get("revision"), planned, view, engine.get("download_dir"))
    except PullError as e:
        return str(e)
    finally:
        view.close()
    return None


def _report(results: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(results, indent=2))
        return
    for r in results:
        line = f"{r['name']}: {r['action']}"
        if r.get("revision") is not None:
            line += f" (revision {r['revision']})"
        if r["action"] in ("rolled out", "unchanged"):
            line += f" at {r['url']}"
        if "seconds" in r:
            line += f" in {r['seconds']:.1f}s"
        if r.get("reason"):
            line += f": {r['reason']}"
        if r["action"] in FAILED and r.get("serving_revision") is not None:
            line += f"; revision {r['serving_revision']} keeps serving"
        print(line, file=sys.stderr if r["action"] in FAILED else sys.stdout)
        if r["action"] not in FAILED:
            for change in r.get("changes", []):  # empty when unchanged
                print(f"  ~ {change}")
