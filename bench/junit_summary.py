"""A JUnit XML report (pytest --junitxml) as a JSON summary: counts, each test's outcome and seconds, and the machine.

    python bench/junit_summary.py bench/results/test-gpu.xml bench/results/test-gpu.json   (make test-gpu runs it)
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    return "passed"


def summary(xml_path: Path) -> dict:
    tests = [
        dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=_outcome(case), seconds=float(case.get("time", 0)))
        for case in ET.parse(xml_path).getroot().iter("testcase")
    ]
    counts = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "error", "skipped")}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    machine = dict(node=platform.node(), python=platform.python_version())
    try:
        import torch

        machine.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return dict(command="make test-gpu", commit=commit, machine=machine, counts=counts, tests=tests)


if __name__ == "__main__":
    report = summary(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["counts"]))
