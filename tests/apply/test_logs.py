"""Logs: rotation by size while a process keeps writing (copy-truncate), and `logs --since/--tail` through the
rotated copies."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from vdeploy.cli import main
from vdeploy.logfiles import rotate_if_large, rotated
from vdeploy.state import Deployment

WRITER = """
import sys, time
for i in range(400):
    print(f"line {i:04d} " + "x" * 90, flush=True)
    time.sleep(0.005)
"""


def test_a_growing_log_is_rotated_and_the_writer_goes_on_writing(tmp_path: Path) -> None:
    log = tmp_path / "replica.log"
    with open(log, "ab") as out:  # as the supervisor starts a replica: its stdout is the file, in append mode
        writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=out)
    rotations = 0
    while writer.poll() is None:
        rotations += rotate_if_large(log, max_bytes=8_000, keep=2)
        time.sleep(0.05)
    assert rotations >= 2 and [p.name for p in rotated(log, keep=2)] == ["replica.log.2", "replica.log.1"]
    assert all(p.stat().st_size < 20_000 for p in [log, *rotated(log, keep=2)])
    # The writer's appends land at the top of the emptied file, not after a hole of zeros.
    current = log.read_text()
    assert "\0" not in current and current.endswith("line 0399 " + "x" * 90 + "\n")
    assert not rotate_if_large(log, max_bytes=1 << 20)


def _stamp(minutes_ago: int) -> str:
    return (datetime.now() - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%d %H:%M:%S,000")


def test_logs_since_and_tail_read_through_rotated_copies(state_dir: Path, capsys) -> None:
    log = Deployment("demo").replica_log(1, 0)
    log.parent.mkdir(parents=True)
    log.with_name(log.name + ".1").write_text(f"{_stamp(60)} INFO old start\nold detail\n{_stamp(30)} INFO half\n")
    newest = f"{_stamp(1)} INFO newest"
    log.write_text(f"{_stamp(8)} INFO recent\nINFO:     uvicorn line without a stamp\n{newest}\n")
    assert main(["logs", "demo", "--since", "45m"]) == 0
    assert [line.split(" INFO ")[-1] for line in capsys.readouterr().out.splitlines()] == [
        "half", "recent", "INFO:     uvicorn line without a stamp", "newest"]
    assert main(["logs", "demo", "--since", "10m", "--tail", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["INFO:     uvicorn line without a stamp", newest]
    assert main(["logs", "demo", "--tail", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "old detail"  # the rotated copy's end comes first
    assert main(["logs", "demo", "--since", "yesterday-ish"]) == 1
    assert "neither a duration" in capsys.readouterr().err


ENGINE_LOGS = """
import logging
from vdeploy_engine.server.launch import _configure_logging
_configure_logging()
logging.getLogger("vdeploy_engine.server").info("KV cache: %d blocks", 12)
"""
SUPERVISOR_LOGS = """
import logging
from vdeploy.logfiles import JsonLines
handler = logging.StreamHandler()
handler.setFormatter(JsonLines())
logging.basicConfig(level=logging.INFO, handlers=[handler])
logging.getLogger("vdeploy.supervisor").info("revision %d serving", 3)
"""


def test_json_log_format_for_the_engine_and_the_supervisor(tmp_path: Path) -> None:
    import json
    import os

    from vdeploy.logfiles import lines_since

    env = {**os.environ, "VDEPLOY_LOG_FORMAT": "json"}
    lines = []
    for code in (ENGINE_LOGS, SUPERVISOR_LOGS):
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        lines.append(result.stderr.strip())
    engine, supervisor = (json.loads(line) for line in lines)
    assert set(engine) == set(supervisor) == {"time", "level", "logger", "message"}
    assert (engine["message"], supervisor["message"]) == ("KV cache: 12 blocks", "revision 3 serving")
    assert list(lines_since(iter(lines), datetime.now() - timedelta(minutes=1))) == lines  # --since reads them
