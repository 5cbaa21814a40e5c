"""`vdeploy profiles list | show NAME | detect`: the hardware profiles recipes can name, and the local GPU."""

from __future__ import annotations

import argparse
import sys

import yaml

from vdeploy.profiles import ProfileError, detect, list_profiles, load_profile


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profiles", help="list, show or detect hardware profiles", description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="one line per profile").set_defaults(func=run_list)
    show = actions.add_parser("show", help="a profile in full")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(func=run_show)
    actions.add_parser("detect", help="the profile `hardware: auto` would pick here").set_defaults(func=run_detect)


def run_list(args: argparse.Namespace) -> int:
    print(f"{'NAME':<11} {'CC':>4} {'MEMORY':>10}  {'BF16':<5} {'FP8':<5} {'GRAPHS':<6}  DESCRIPTION")
    for p in list_profiles():
        capability = f"{p.compute_capability:.1f}" if p.compute_capability else "-"
        print(f"{p.name:<11} {capability:>4} {p.memory_gib:>6.2f} GiB  {_yes(p.bf16):<5} {_yes(p.fp8):<5} "
              f"{_yes(p.cuda_graphs):<6}  {p.description}")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def run_show(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.name)
    except ProfileError as exc:
        print(f"vdeploy profiles: {exc}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    print(yaml.safe_dump(profile.model_dump(), sort_keys=False).rstrip())
    return 0


def run_detect(args: argparse.Namespace) -> int:
    found = detect()
    if not found.count:
        print(f"no GPU found (tried nvidia-smi, NVML, torch): profile cpu with this machine's "
              f"{found.memory_gib:.1f} GiB of RAM")
        return 0
    capability = f", compute capability {found.compute_capability}" if found.compute_capability else ""
    print(f"{found.count} x {found.gpu_name} ({found.memory_gib:.1f} GiB{capability}) via {found.method}: "
          f"profile {found.profile}")
    return 0
