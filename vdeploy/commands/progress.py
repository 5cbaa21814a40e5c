"""What `apply` shows while it waits: each new replica's phase (pulling with bytes and rate, loading weights, warming,
health check), read from the supervisor's status file, which carries the engine's own start-up events.

On a terminal: a rich progress bar per replica. Piped: a plain line at each phase change and each quarter of a
counted phase. With `-o json`: one JSON object per change. All of it on stderr; stdout keeps the result.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

MiB = 1 << 20


def replica_phase(replica: dict[str, Any]) -> dict[str, Any]:
    """The phase a person should see for one replica of the status file: the engine's event while it starts."""
    state = replica.get("state")
    if state != "starting":
        return {"phase": state, "error": replica.get("last_error")} if replica.get("last_error") else {"phase": state}
    event = dict(replica.get("phase") or {"phase": "starting"})
    if event["phase"] == "serving":  # the engine is up; the supervisor's health probe decides when it is ready
        event = {"phase": "health check"}
    return event


def describe(event: dict[str, Any]) -> str:
    """`pulling 1.2 GiB / 3.4 GiB (35%) at 45.0 MiB/s`, `loading 120/290 weights`, `warming`."""
    text = event["phase"]
    if event.get("total"):
        done, total = event.get("done", 0), event["total"]
        if event.get("unit") == "B":
            text += f" {done / (1 << 30):.2f} GiB / {total / (1 << 30):.2f} GiB"
        else:
            text += f" {done}/{total} {event.get('unit', '')}".rstrip()
        text += f" ({100 * done // total}%)"
        if event.get("rate"):
            text += f" at {event['rate'] / MiB:.1f} MiB/s"
    if event.get("error"):
        text += f": {event['error']}"
    return text


class PhaseView:
    """Shows phases of named pieces of work (replicas, a download) as they change; `close` when done."""

    def __init__(self, output: str, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.output = output
        self.seen: dict[str, tuple[str, int]] = {}  # label -> (phase, quarter) last shown
        self.bars = None
        if output == "text" and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[detail]}"), console=Console(file=self.stream))
            self.tasks: dict[str, Any] = {}
            self.bars.start()

    def show(self, label: str, event: dict[str, Any], fields: dict[str, Any]) -> None:
        """`event`: an engine event ({"phase", "done", "total", "unit", "rate"}); `fields` name the work in JSON."""
        if self.bars is not None:
            return self._bar(label, event)
        total = event.get("total") or 0
        quarter = 4 * event.get("done", 0) // total if total else 0
        if self.seen.get(label) == (event["phase"], quarter):
            return
        self.seen[label] = (event["phase"], quarter)
        if self.output == "json":
            print(json.dumps({**fields, "time": round(time.time(), 3), **event}), file=self.stream, flush=True)
        else:
            print(f"{label}: {describe(event)}", file=self.stream, flush=True)

    def _bar(self, label: str, event: dict[str, Any]) -> None:
        detail = describe(event).removeprefix(event["phase"]).strip()
        total = event.get("total")
        done = event.get("done", 0) if total else 0
        if event["phase"] in ("ready", "failed", "crashed"):
            total = done = 1
        description = f"{label}: {event['phase']}"
        if label not in self.tasks:
            self.tasks[label] = self.bars.add_task(description, total=total, detail=detail)
        self.bars.update(self.tasks[label], description=description, total=total, completed=done, detail=detail)

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()


class RolloutProgress(PhaseView):
    """Feed it each status read (`update`) while a rollout runs."""

    def update(self, name: str, status: dict[str, Any], revision: int) -> None:
        for replica in status.get("replicas", []):
            if replica.get("revision") == revision:
                self.show(f"{name} revision {revision} replica {replica['index']}", replica_phase(replica),
                          {"event": "replica", "name": name, "revision": revision, "replica": replica["index"]})
