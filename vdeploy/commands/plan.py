"""`vdeploy plan FILE`: the resolved EngineConfig and the memory table of each recipe in FILE. Exit 1 on errors."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from vdeploy.diagnostics import Diagnostic, format_diagnostics, has_errors, use_color
from vdeploy.plan import Plan
from vdeploy.recipe import load_recipes

GiB = 1 << 30


@dataclass
class PlannedRecipe:
    name: str | None
    plan: Plan | None
    diagnostics: list[Diagnostic]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="show the resolved engine settings and memory plan",
                                   description=__doc__)
    add_file_arguments(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="output format (default: text); json gives one object, or a list when FILE holds several")
    parser.add_argument("--detailed-exitcode", action="store_true",
                        help="exit 0 when `apply` would change nothing, 2 when it would, 1 on errors (as terraform)")
    parser.set_defaults(func=run)


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a recipe file")
    parser.add_argument("--name", help="only the recipe with this name (when FILE holds several)")


def plan_file(path: str, name: str | None = None) -> list[PlannedRecipe]:
    from vdeploy.compiler import plan_recipe

    results = []
    for document in load_recipes(path):
        recipe = document.recipe
        if name is not None and (recipe is None or recipe.deployment_name != name):
            continue
        if recipe is None:
            results.append(PlannedRecipe(None, None, document.diagnostics))
            continue
        plan, diagnostics = plan_recipe(recipe, document.source)
        results.append(PlannedRecipe(recipe.deployment_name, plan, document.diagnostics + diagnostics))
    return results


def plan_json(result: PlannedRecipe) -> dict:
    plan = result.plan
    diagnostics = [d.model_dump(exclude={"field"}) for d in result.diagnostics]
    if plan is None:
        return {"name": result.name, "engine": None, "memory": None, "decisions": [], "diagnostics": diagnostics}
    return {
        "name": plan.name, "profile": plan.profile, "gpu_count": plan.gpu_count, "replicas": plan.replicas,
        "backend": plan.backend, "engine": plan.engine.to_dict(), "env": plan.env,
        "memory": plan.memory.model_dump() if plan.memory else None,
        "decisions": [d.model_dump() for d in plan.decisions], "diagnostics": diagnostics,
        "health": plan.health, "rollout": plan.rollout,
    }


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def plan_text(plan: Plan) -> str:
    e = plan.engine
    lines = [
        f"deployment  {plan.name}   backend {plan.backend}   replicas {plan.replicas}",
        f"hardware    {plan.profile}" + (f" x {plan.gpu_count}" if e.device == "cuda" else ""),
        f"model       {e.model}",
        f"served as   {e.name}   on {e.host}:{e.port}",
        f"engine      dtype {e.dtype}, quantization {e.quantization or 'none'}, runner {e.runner}"
        + (f"/{e.convert}" if e.convert != "none" else "")
        + f", tp {e.tensor_parallel_size}, pp {e.pipeline_parallel_size}, eager {str(e.enforce_eager).lower()}",
        f"batching    max_model_len {e.max_model_len}, max_num_seqs {e.max_num_seqs}, "
        f"max_num_batched_tokens {e.max_num_batched_tokens}, block_size {e.block_size}",
    ]
    if plan.env:
        lines.append("env         " + " ".join(f"{k}={v}" for k, v in plan.env.items()))
    m = plan.memory
    if m is None:
        lines.append("memory      not checked (model facts unavailable)")
        return "\n".join(lines)
    where = "per GPU" if e.device == "cuda" else "on the CPU"
    lines += [
        f"memory {where}",
        f"  budget       {_gib(m.budget_bytes)}   gpu_memory_utilization {e.gpu_memory_utilization}",
        f"  weights      {_gib(m.weights_bytes)}",
        f"  activations  {_gib(m.activation_bytes)}",
        f"  cuda graphs  {_gib(m.cuda_graph_bytes)}",
        f"  overhead     {_gib(m.overhead_bytes)}",
        f"  kv cache     {_gib(m.kv_cache_bytes)}   {m.kv_tokens:,} tokens at {m.kv_bytes_per_token:,} B/token, "
        f"{m.max_concurrency}x max_model_len",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = plan_file(args.file, args.name)
    if not results:
        print(f"vdeploy plan: no recipe named {args.name!r} in {args.file}", file=sys.stderr)
        return 1
    diagnostics = [d for r in results for d in r.diagnostics]
    if args.format == "json":
        objects = [plan_json(r) for r in results]
        print(json.dumps(objects[0] if len(objects) == 1 else objects, indent=2))
    else:
        print("\n\n".join(plan_text(r.plan) for r in results if r.plan is not None))
        shown = [d for d in diagnostics if d.severity != "info"]
        if shown:
            print(format_diagnostics(shown, "text", color=use_color(sys.stderr)), file=sys.stderr)
    if has_errors(diagnostics):
        return 1
    if args.detailed_exitcode:
        from vdeploy.rollout import pending_changes

        pending = {r.name: pending_changes(r.plan.model_dump(mode="json")) for r in results}
        for name, changes in pending.items():
            print("\n".join([f"{name}: " + ("would change" if changes else "no change"), *(f"  ~ {c}" for c in changes)]),
                  file=sys.stderr)
        return 2 if any(pending.values()) else 0
    return 0
