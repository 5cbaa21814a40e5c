"""Process primitives of the supervisor with real processes: whole-group stops and no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from vdeploy.supervisor import Replica, stop_process_group

# A process group whose leader and child both ignore SIGTERM: only SIGKILL after the grace period ends them.
STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


def test_stop_process_group_kills_stubborn_leader_and_children() -> None:
    leader = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    child_pid = int(leader.stdout.readline())
    started = time.monotonic()
    stop_process_group(leader.pid, grace=1.0)
    assert time.monotonic() - started >= 1.0  # SIGTERM first, SIGKILL only after the grace period
    assert leader.wait(timeout=5) == -signal.SIGKILL
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


def test_stop_process_group_ends_a_stopped_process_with_its_sigterm_not_the_grace_period() -> None:
    # A hung replica (SIGSTOP here) that handles SIGTERM, as uvicorn does, must run to act on it: it gets SIGCONT
    # with it, as systemd sends.
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); "
        "print(1, flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    process.stdout.readline()  # the handler is in place
    process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    stop_process_group(process.pid, grace=20.0)
    assert time.monotonic() - started < 10.0
    assert process.wait(timeout=5) == 3  # its own SIGTERM handler ran


def test_stop_process_group_leaves_a_reused_pid_alone() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        stop_process_group(bystander.pid, grace=0.5, create_time=psutil.Process(bystander.pid).create_time() - 100)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_replica_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    # A stand-in supervisor starts a replica the way the real one does, then is killed with SIGKILL.
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from vdeploy.supervisor import Replica
        r = Replica(1, 0, 1, None, [sys.executable, "-c", "import time; time.sleep(60)"], {{}},
                    Path({str(tmp_path / "r.log")!r}))
        r.start()
        print(r.process.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    replica_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(replica_pid)
    parent.kill()
    parent.wait()
    gone, _ = (
        psutil.wait_procs([psutil.Process(replica_pid)], timeout=5) if psutil.pid_exists(replica_pid) else ([1], [])
    )
    assert gone, "the replica outlived its supervisor"


def test_replica_log_tail_is_this_attempt_only(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    # Output is built at run time so that it differs from the argv, which the log's header line repeats.
    argv = [sys.executable, "-c", "import sys; print('attempt', 'output'); sys.exit('Value' + 'Error: bad dtype')"]
    replica = Replica(1, 0, 1, None, argv, {}, log)
    replica.start()
    replica.process.wait()
    first = replica.log_tail()
    replica.start()
    replica.process.wait()
    assert replica.log_tail().count("attempt output") == 1 and first.count("attempt output") == 1
    assert log.read_text().count("attempt output") == 2  # the file keeps both attempts
    assert replica.failure_reason() == "ValueError: bad dtype"
