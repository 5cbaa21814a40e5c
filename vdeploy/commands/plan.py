"""`vdeploy plan FILE`: the resolved EngineConfig and the memory table of each recipe in FILE. Exit 1 on errors.

With --sweep KEY=VALUES, one compile per value instead: a table of what fits (see vdeploy/sweep.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from vdeploy.commands.output import add_output_argument, emit
from vdeploy.diagnostics import Diagnostic, format_diagnostics, has_errors, use_color
from vdeploy.plan import MemoryBudget, Plan
from vdeploy.recipe import SourceMap, load_recipes

GiB = 1 << 30


EXAMPLES = """examples:
  vdeploy plan recipes/quickstart-smollm2-cpu.yaml
  vdeploy plan recipe.yaml -o json
  vdeploy plan recipe.yaml --sweep memory.max_model_len=2048..32768
  vdeploy plan recipe.yaml --sweep hardware=t4,l4,a100-40gb
  vdeploy plan recipe.yaml --detailed-exitcode   # in CI: exit 2 when apply would change something
"""


@dataclass
class PlannedRecipe:
    name: str | None
    plan: Plan | None
    diagnostics: list[Diagnostic]
    source: SourceMap | None = None  # where each key of the recipe was written


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="show the resolved engine settings and memory plan", description=__doc__,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    add_output_argument(parser)
    parser.add_argument("--detailed-exitcode", action="store_true",
                        help="exit 0 when `apply` would change nothing, 2 when it would, 1 on errors (as terraform)")
    parser.add_argument("--sweep", metavar="KEY=VALUES",
                        help="what fits: one plan per value, e.g. memory.max_model_len=2048..32768, "
                             "gpu_memory_utilization=0.5..0.95, max_num_seqs=8,16,64, hardware=all")
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
            results.append(PlannedRecipe(None, None, document.diagnostics, document.source))
            continue
        plan, diagnostics = plan_recipe(recipe, document.source)
        results.append(PlannedRecipe(recipe.deployment_name, plan, document.diagnostics + diagnostics, document.source))
    return results


def plan_json(result: PlannedRecipe) -> dict:
    plan = result.plan
    diagnostics = [d.model_dump(exclude={"field"}) for d in result.diagnostics]
    if plan is None:
        return {"name": result.name, "engine": None, "memory": None, "decisions": [], "diagnostics": diagnostics}
    return {
        "name": plan.name, "profile": plan.profile, "gpu_count": plan.gpu_count, "replicas": plan.replicas,
        "backend": plan.backend, "engine": plan.engine.to_dict(), "env": plan.env,
        "memory": dataclasses.asdict(plan.memory) if plan.memory else None,
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
        budget_bar(m),
    ]
    return "\n".join(lines)


# The stacked bar under the memory table: one letter per term of the budget, in the table's order.
BAR_TERMS = (("weights_bytes", "W", "weights"), ("activation_bytes", "A", "activations"),
             ("cuda_graph_bytes", "G", "cuda graphs"), ("overhead_bytes", "O", "overhead"),
             ("kv_cache_bytes", "K", "kv cache"))
BAR_WIDTH = 60


def budget_bar(m: MemoryBudget, width: int = BAR_WIDTH) -> str:
    """The budget as a stacked bar; unused budget is '.', and a plan over budget is scaled to what it needs."""
    sizes = [max(getattr(m, term), 0) for term, _, _ in BAR_TERMS]
    used = sum(sizes)
    sizes.append(max(m.budget_bytes - used, 0))
    letters = [letter for _, letter, _ in BAR_TERMS] + ["."]
    bar = "".join(letter * cells for letter, cells in zip(letters, _apportion(sizes, width), strict=True))
    legend = "  ".join(f"{letter} {name}" for (term, letter, name), size in zip(BAR_TERMS, sizes, strict=False) if size)
    over = used - m.budget_bytes
    legend += "  . unused" if sizes[-1] else (f"  over budget by {over / GiB:.2f} GiB" if over > 0 else "")
    return f"  [{bar}]  {legend}"


def _apportion(sizes: list[int], width: int) -> list[int]:
    """Whole cells for each size, `width` in all; every nonzero size gets at least one (largest remainders first)."""
    total = sum(sizes) or 1
    exact = [size * width / total for size in sizes]
    cells = [max(1, int(e)) if size else 0 for size, e in zip(sizes, exact, strict=True)]
    while sum(cells) < width:
        cells[max(range(len(cells)), key=lambda i: exact[i] - cells[i])] += 1
    while sum(cells) > width:
        cells[max((i for i in range(len(cells)) if cells[i] > 1), key=lambda i: cells[i] - exact[i])] -= 1
    return cells


def decisions_text(plan: Plan) -> str:
    """`-o wide`'s addition: every decision the compiler made, one line each (`vdeploy explain` gives the reasons)."""
    from vdeploy.commands.explain import value_text

    return "\n".join(["decisions", *(f"  {d.field} = {value_text(d.value)}" for d in plan.decisions)])


def run(args: argparse.Namespace) -> int:
    if args.sweep:
        from vdeploy.commands.plan_sweep import run_sweep

        return run_sweep(args)
    results = plan_file(args.file, args.name)
    if not results:
        print(f"vdeploy plan: no recipe named {args.name!r} in {args.file}", file=sys.stderr)
        return 1
    diagnostics = [d for r in results for d in r.diagnostics]
    if args.output in ("json", "yaml"):
        objects = [plan_json(r) for r in results]
        emit(objects[0] if len(objects) == 1 else objects, args.output)
    else:
        wide = args.output == "wide"
        print("\n\n".join(plan_text(r.plan) + ("\n" + decisions_text(r.plan) if wide else "")
                           for r in results if r.plan is not None))
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
