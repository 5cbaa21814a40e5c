"""Start-up progress: pulling the model, loading its weights, warming up.

Two audiences. A person calling `LLM(...)` in a terminal sees tqdm bars, as vLLM shows them. A supervisor watching
a replica reads its log, where, once `use_events()` has been called (the server does it), each phase and its counts
are one line: `vdeploy-phase {"phase": "loading", "done": 120, "total": 290, "unit": "weights"}`, at most a few a
second. The format is the contract: the supervisor parses these lines and nothing else of the log.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MARK = "vdeploy-phase "
EVERY_S = 0.5  # the least time between two events of one phase (the last one is always written)

_events = False


def use_events() -> None:
    """Report phases as `vdeploy-phase` lines on stderr (for a supervisor) instead of progress bars."""
    global _events
    _events = True


def reporting_events() -> bool:
    """Whether phases go to a supervisor (then libraries' own progress bars only clutter the log)."""
    return _events


def phase(name: str, **fields: Any) -> None:
    """A phase begins: `pulling`, `loading`, `warming` or `serving`."""
    if _events:
        _emit({"phase": name, **fields})


def _emit(event: dict[str, Any]) -> None:
    print(MARK + json.dumps(event), file=sys.stderr, flush=True)


class Progress:
    """Counted work within a phase: a tqdm bar for a person at a terminal, throttled events for a supervisor."""

    def __init__(self, name: str, total: int, unit: str, description: str):
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self.started = time.monotonic()
        self._last = 0.0
        self._bar = None
        if not _events:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file, a test).
            self._bar = tqdm(total=total, unit=unit, desc=description, disable=None, unit_scale=unit == "B")

    def update_to(self, done: int) -> None:
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
        elif time.monotonic() - self._last >= EVERY_S:
            self._report()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._report()

    def _report(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self.started
        event = {"phase": self.name, "done": self.done, "total": self.total, "unit": self.unit}
        if self.unit == "B" and elapsed > 0:
            event["rate"] = round(self.done / elapsed)
        _emit(event)


@contextmanager
def watch(name: str, total: int, unit: str, description: str, measure: Callable[[], int]) -> Iterator[None]:
    """Report `measure()` (e.g. bytes on disk) as the progress of work that reports nothing itself, until it ends.
    Only for a supervisor: a person sees the work's own bars."""
    if not _events:
        yield
        return
    progress = Progress(name, total, unit, description)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(EVERY_S):
            progress.update_to(measure())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress.update_to(measure())
        progress.close()
