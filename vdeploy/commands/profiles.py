"""`vdeploy profiles list | show NAME | detect`: the hardware profiles recipes can name, and the local GPU."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from vdeploy.commands.output import add_output_argument, emit
from vdeploy.profiles import ProfileError, detect, list_profiles, load_profile

EXAMPLES = """examples:
  vdeploy profiles list -o wide
  vdeploy profiles show t4 -o json
  vdeploy profiles detect

environment:
  VDEPLOY_PROFILE_PATH   folders (separated by ':') of extra profiles; a profile there overrides a shipped one
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profiles", help="list, show or detect hardware profiles", description=__doc__,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per profile")
    add_output_argument(listing)
    listing.set_defaults(func=run_list)
    show = actions.add_parser("show", help="a profile in full (YAML, or -o json)")
    show.add_argument("name", metavar="NAME")
    add_output_argument(show, ("text", "json", "yaml"))
    show.set_defaults(func=run_show)
    detect_parser = actions.add_parser("detect", help="the profile `hardware: auto` would pick here")
    add_output_argument(detect_parser, ("text", "json", "yaml"))
    detect_parser.set_defaults(func=run_detect)


def run_list(args: argparse.Namespace) -> int:
    profiles = list_profiles()
    if args.output in ("json", "yaml"):
        emit([p.model_dump() for p in profiles], args.output)
        return 0
    wide = args.output == "wide"
    extra = f"  {'GPUS':>4} {'SEQS':>4} {'TOKENS':>6}  {'INTERCONNECT':<12} {'ATTENTION':<16}" if wide else ""
    print(f"{'NAME':<11} {'CC':>4} {'MEMORY':>10}  {'BF16':<5} {'FP8':<5} {'GRAPHS':<6}{extra}  DESCRIPTION")
    for p in profiles:
        capability = f"{p.compute_capability:.1f}" if p.compute_capability else "-"
        extra = (f"  {p.gpu_count:>4} {p.max_num_seqs:>4} {p.max_num_batched_tokens:>6}  {p.interconnect:<12} "
                 f"{p.attention_backend:<16}") if wide else ""
        print(f"{p.name:<11} {capability:>4} {p.memory_gib:>6.2f} GiB  {_yes(p.bf16):<5} {_yes(p.fp8):<5} "
              f"{_yes(p.cuda_graphs):<6}{extra}  {p.description}")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def run_show(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.name)
    except ProfileError as exc:
        print(f"vdeploy profiles: {exc}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    if args.output == "json":
        emit(profile.model_dump(), "json")
    else:
        print(yaml.safe_dump(profile.model_dump(), sort_keys=False).rstrip())
    return 0


def run_detect(args: argparse.Namespace) -> int:
    found = detect()
    if args.output in ("json", "yaml"):
        emit(dataclasses.asdict(found), args.output)
        return 0
    if not found.count:
        print(f"no GPU found (tried nvidia-smi, NVML, torch): profile cpu with this machine's "
              f"{found.memory_gib:.1f} GiB of RAM")
        return 0
    capability = f", compute capability {found.compute_capability}" if found.compute_capability else ""
    print(f"{found.count} x {found.gpu_name} ({found.memory_gib:.1f} GiB{capability}) via {found.method}: "
          f"profile {found.profile}")
    return 0
