"""Wall time of `vdeploy lint recipes/` (goal: under 0.3 s for all recipes), against baselines measured in the same run.

Runs each command REPEATS times in a fresh interpreter and reports the median wall time and CPU time (user + sys):
  lint      python -m vdeploy.cli lint recipes/        what a user or CI runs
  startup   python -c pass                              the interpreter alone (the floor for any Python CLI)
  pydantic  python -c "from pydantic import BaseModel; ..."  one pydantic model built (the recipe schema's floor)
  imports   python -c "import vdeploy.compiler, ..."    the control plane loaded, nothing linted
and the in-process time of linting every recipe once imports are done. Writes bench/results/lint.json.

    python3 bench/lint_bench.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 0.3
COMMANDS = {
    "lint": [sys.executable, "-m", "vdeploy.cli", "lint", "recipes/"],
    "startup": [sys.executable, "-c", "pass"],
    "pydantic": [sys.executable, "-c", "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int\nM(x=1)"],
    "imports": [sys.executable, "-c", "import vdeploy.cli, vdeploy.compiler, vdeploy.commands.lint"],
}


def time_command(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one run; fails loudly if the command fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def in_process_lint_s(repeats: int) -> float:
    sys.path.insert(0, str(ROOT))
    from vdeploy.commands.lint import lint_paths

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        diagnostics, checked = lint_paths([str(ROOT / "recipes")])
        times.append(time.perf_counter() - start)
        assert checked and not diagnostics, diagnostics
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every command alike
        for name, argv in COMMANDS.items():
            samples[name].append(time_command(argv))
    results = {name: {"wall_s": round(statistics.median(w for w, _ in runs), 4),
                      "cpu_s": round(statistics.median(c for _, c in runs), 4)} for name, runs in samples.items()}
    recipes = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    lint, startup = results["lint"], results["startup"]
    record = {
        "command": "python3 bench/lint_bench.py " + " ".join(sys.argv[1:]),
        "measured": " ".join(COMMANDS["lint"][1:]),
        "recipes": recipes,
        "repeats": args.repeats,
        "goal_s": GOAL_S,
        "results": results,
        "in_process_lint_s": round(in_process_lint_s(args.repeats), 4),
        "lint_wall_vs_goal": round(lint["wall_s"] / GOAL_S, 3),
        "lint_wall_vs_startup": round(lint["wall_s"] / startup["wall_s"], 3),
        "lint_cpu_vs_goal": round(lint["cpu_s"] / GOAL_S, 3),
        "lint_cpu_above_pydantic_floor_s": round(lint["cpu_s"] - results["pydantic"]["cpu_s"], 4),
        "meets_goal_wall": lint["wall_s"] < GOAL_S,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                    "platform": platform.platform()},
    }
    out = ROOT / "bench" / "results" / "lint.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:<8} wall {r['wall_s'] * 1000:7.1f} ms   cpu {r['cpu_s'] * 1000:7.1f} ms")
    print(f"in-process lint of {len(recipes)} files: {record['in_process_lint_s'] * 1000:.1f} ms")
    print(f"lint wall / goal {GOAL_S} s = {record['lint_wall_vs_goal']}; lint wall / bare startup = "
          f"{record['lint_wall_vs_startup']}  -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
