"""Start-up progress from the engine to `apply`: the engine's phase lines, the supervisor reading them from the
replica's log, and what apply prints from the status file (plain lines, JSON events, rich bars on a terminal)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from tests.fixtures.golden import assert_golden
from vdeploy.commands.progress import RolloutProgress, describe
from vdeploy.supervisor import PHASE_MARK, Replica
from vdeploy_engine import progress

ENGINE_STARTUP = """
from vdeploy_engine import progress
progress.use_events()
bar = progress.Progress("loading", 4, "weights", "Loading weights")
for done in range(1, 5):
    bar.update_to(done)
bar.close()
progress.phase("warming")
print("some other log line", flush=True)
"""


def test_the_supervisor_reads_the_engines_latest_phase_from_the_log(tmp_path: Path) -> None:
    assert PHASE_MARK == progress.MARK  # the two sides of the contract share no import
    replica = Replica(1, 0, 1, None, [sys.executable, "-c", ENGINE_STARTUP], dict(os.environ), tmp_path / "replica.log")
    replica.start()
    replica.process.wait(timeout=60)
    log = replica.log_path.read_text()
    events = [json.loads(line[len(PHASE_MARK):]) for line in log.splitlines() if line.startswith(PHASE_MARK)]
    # The first count and the last; those between fall inside the half-second throttle.
    assert events == [{"phase": "loading", "done": 1, "total": 4, "unit": "weights"},
                      {"phase": "loading", "done": 4, "total": 4, "unit": "weights"}, {"phase": "warming"}]
    assert replica.read_phase() and replica.phase == {"phase": "warming"}
    assert not replica.read_phase()  # nothing new
    assert replica.to_status()["phase"] == {"phase": "warming"}


def _status(*replicas: dict) -> dict:
    return {"replicas": [{"index": i, "revision": 2, "state": "starting", **r} for i, r in enumerate(replicas)]}


GiB = 1 << 30
STEPS = [
    _status({"phase": None}),
    _status({"phase": {"phase": "pulling", "done": GiB // 10, "total": 4 * GiB, "unit": "B", "rate": 50 << 20}}),
    _status({"phase": {"phase": "pulling", "done": GiB // 5, "total": 4 * GiB, "unit": "B", "rate": 50 << 20}}),
    _status({"phase": {"phase": "pulling", "done": 2 * GiB, "total": 4 * GiB, "unit": "B", "rate": 60 << 20}}),
    _status({"phase": {"phase": "loading", "done": 10, "total": 290, "unit": "weights"}}),
    _status({"phase": {"phase": "loading", "done": 290, "total": 290, "unit": "weights"}}),
    _status({"phase": {"phase": "warming"}}),
    _status({"phase": {"phase": "serving", "port": 1234}}),
    _status({"state": "ready", "phase": {"phase": "serving", "port": 1234}}),
]


def test_piped_apply_prints_a_line_per_phase_and_quarter() -> None:
    out = io.StringIO()
    view = RolloutProgress("text", out)
    for status in STEPS:
        view.update("demo", status, 2)
        view.update("demo", {"replicas": [{"index": 0, "revision": 1, "state": "ready"}]}, 2)  # old revision: unseen
    view.close()
    assert_golden("apply-progress-piped.txt", out.getvalue())


def test_apply_json_events_carry_the_counts() -> None:
    out = io.StringIO()
    view = RolloutProgress("json", out)
    for status in STEPS:
        view.update("demo", status, 2)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["phase"] for e in events] == ["starting", "pulling", "pulling", "loading", "loading", "warming",
                                            "health check", "ready"]
    assert events[1] | {"time": 0} == {"event": "replica", "name": "demo", "revision": 2, "replica": 0, "time": 0,
                                       "phase": "pulling", "done": GiB // 10, "total": 4 * GiB, "unit": "B",
                                       "rate": 50 << 20}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_apply_draws_bars() -> None:
    out = Terminal()
    view = RolloutProgress("text", out)
    for status in STEPS[:4]:
        view.update("demo", status, 2)
    view.bars.refresh()
    view.close()
    screen = out.getvalue()
    assert "demo revision 2 replica 0: pulling" in screen and "2.00 GiB / 4.00 GiB (50%) at 60.0 MiB/s" in screen
    assert "━" in screen  # rich's bar


def test_describe() -> None:
    assert describe({"phase": "loading", "done": 3, "total": 12, "unit": "weights"}) == "loading 3/12 weights (25%)"
    assert describe({"phase": "failed", "error": "CUDA out of memory"}) == "failed: CUDA out of memory"


def test_llm_shows_a_weight_loading_bar_in_a_terminal() -> None:
    """Without events (a person's `LLM(...)`), the same Progress is a tqdm bar, as vLLM shows it, on a terminal."""
    code = ("from vdeploy_engine import progress\n"
            "bar = progress.Progress('loading', 3, 'weights', 'Loading weights')\n"
            "[bar.update_to(i) for i in (1, 2, 3)]; bar.close()\n")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen([sys.executable, "-c", code], stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen = b""
    try:
        while chunk := os.read(controller, 4096):
            screen += chunk
    except OSError:  # the terminal closed: the process is done
        pass
    finally:
        os.close(controller)
    assert process.wait(timeout=60) == 0
    assert b"Loading weights" in screen and b"3/3" in screen
