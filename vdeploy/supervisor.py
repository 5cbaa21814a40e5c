"""The supervisor: one process per deployment that runs its replicas, the router in front of them, and its rollouts.

It runs one asyncio loop: the router (uvicorn), a 0.25 s tick that watches replicas (exit, health) and the desired
revision, and at most one rollout task. Each replica runs in its own session (so its process group can be stopped as
a whole) and gets SIGKILL from the kernel if the supervisor dies (PR_SET_PDEATHSIG), so nothing is orphaned even by
`kill -9`; the next supervisor also stops any group recorded in status.json that is somehow still alive.

`python -m vdeploy.supervisor NAME` runs it in the foreground; `start_detached` runs that in a new session.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from vdeploy.backends import BackendUnavailable, replica_command, replica_env
from vdeploy.logfiles import JsonLines, rotate_if_large
from vdeploy.rollout import RolloutFailed, roll_out, root_cause
from vdeploy.router import Backend, PortInUse, Router, bind, serve
from vdeploy.secrets import EnvReferenceError
from vdeploy.state import Deployment

log = logging.getLogger("vdeploy.supervisor")

TICK_S = 0.25
# Health probes (the recipe's `health` section overrides these): starting replicas are probed every tick, ready ones
# every `interval` s. Readiness: `failure_threshold` failures in a row take a ready replica out of the router until
# it recovers. Liveness: a replica still unhealthy `failure_threshold` x `interval` s later is restarted (an engine
# that is alive but cannot serve does not heal by waiting).
HEALTH_DEFAULTS = {"path": "/health", "interval": 10.0, "timeout": 5.0, "failure_threshold": 3}
STABLE_AFTER_S = 60.0  # a replica up this long after a restart is no longer crash-looping
MAX_BACKOFF_S = 60.0
CRASH_LOOP_AFTER = 3  # consecutive crashes within STABLE_AFTER_S of their start
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
DRAIN_TIMEOUT_S = 60.0
ROTATE_EVERY_S = 10.0

_PR_SET_PDEATHSIG = 1
# How an engine reports its start-up phases in its log: vdeploy_engine.progress writes one line per event, this mark
# then JSON (the two sides share no import; a test holds them equal).
PHASE_MARK = "vdeploy-phase "


def clock() -> float:
    """The supervisor's clock for replica bookkeeping (starts, readiness, crashes, backoff); tests replace it."""
    return time.monotonic()


def _die_with_parent() -> None:
    """Runs in the replica between fork and exec: the kernel SIGKILLs it when the supervisor's thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(pid: int, grace: float = STOP_GRACE_S, create_time: float | None = None) -> None:
    """SIGTERM (and SIGCONT) the process group led by `pid`, SIGKILL it after `grace` s; waits until every member is
    gone.

    With `create_time`, acts only if `pid` is still the process that was started then (pids get reused).
    """
    try:
        leader = psutil.Process(pid)
        if create_time is not None and abs(leader.create_time() - create_time) > 0.01:
            return
    except psutil.NoSuchProcess:
        pass
    if not _group_members(pid):
        return
    _signal_group(pid, signal.SIGTERM)
    _signal_group(pid, signal.SIGCONT)  # as systemd does: a stopped (hung) process must run to act on the SIGTERM
    if not _wait_group_gone(pid, grace):
        _signal_group(pid, signal.SIGKILL)
        _wait_group_gone(pid, 5.0)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of the group; zombies count as gone (their parent may not be us, and PID 1 may not reap)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def assign_gpus(plan: dict[str, Any], in_use: set[int], count: int) -> list[list[int] | None] | None:
    """GPUs for `count` replicas of `plan` (tensor x pipeline parallel size each, lowest free first), all None on the
    CPU, or None when the host's free GPUs are too few."""
    engine = plan["engine"]
    if engine.get("device") != "cuda":
        return [None] * count
    per_replica = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
    free = [g for g in range(int(plan.get("gpu_count", 0))) if g not in in_use]
    if len(free) < count * per_replica:
        return None
    return [free[i * per_replica : (i + 1) * per_replica] for i in range(count)]


@dataclass(eq=False)
class Replica:
    """One engine server process of one revision; restarted in place (same port and GPUs) when it crashes."""

    revision: int
    index: int
    port: int
    gpus: list[int] | None
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    health: dict[str, Any] = field(default_factory=lambda: dict(HEALTH_DEFAULTS))
    process: subprocess.Popen | None = None
    state: str = "starting"  # starting | ready | unhealthy | restarting | crashed | failed | stopping
    restarts: int = 0
    quick_crashes: int = 0
    ever_ready: bool = False
    started_at: float = 0.0
    ready_since: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = 0.0  # the wait before the pending restart
    admitted: bool = False  # routed to during a rolling update, before its revision is the serving one
    next_health_at: float = 0.0
    health_failures: int = 0
    unhealthy_since: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock, so that status can show the newest error of all
    log_offset: int = 0
    phase: dict[str, Any] | None = None  # the engine's latest start-up event (pulling, loading, warming, serving)
    backend: Backend = field(init=False)

    def __post_init__(self) -> None:
        self.backend = Backend(f"http://127.0.0.1:{self.port}", self.revision, self.index)

    @property
    def crash_loop(self) -> bool:
        return self.quick_crashes >= CRASH_LOOP_AFTER

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            out.write(
                f"--- vdeploy {stamp}: start revision {self.revision} replica {self.index} "
                f"(restart {self.restarts}): {' '.join(self.argv)}\n".encode()
            )
            out.flush()
            self.log_offset = out.tell()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self.state = "starting"
        self.phase = None
        self.started_at = clock()
        self.next_health_at = 0.0
        self.health_failures = 0

    def log_tail(self, limit: int = 20000) -> str:
        """This attempt's output (since the last start), at most its last `limit` bytes."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self.log_offset, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def read_phase(self) -> bool:
        """Take the engine's latest start-up event from this attempt's log; True when it changed."""
        tail = self.log_tail(limit=8192)
        at = tail.rfind(PHASE_MARK)
        if at < 0 or (at > 0 and tail[at - 1] != "\n"):
            return False
        try:
            phase = json.loads(tail[at + len(PHASE_MARK):].split("\n", 1)[0])
        except ValueError:  # the line is still being written
            return False
        changed, self.phase = phase != self.phase, phase
        return changed

    def failure_reason(self) -> str:
        return root_cause(self.log_tail(), self.process.returncode if self.process else None)

    def record_error(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()

    def schedule_restart(self, now: float) -> None:
        """Restart after a backoff that doubles with each crash soon after a start (a crash loop)."""
        self.quick_crashes = self.quick_crashes + 1 if now - self.started_at < STABLE_AFTER_S else 1
        self.backoff_s = min(2.0 ** (self.quick_crashes - 1), MAX_BACKOFF_S)
        self.state = "crashed"
        self.restart_at = now + self.backoff_s

    def to_status(self) -> dict[str, Any]:
        pid = self.process.pid if self.process else None
        create_time = None
        if pid and self.process.poll() is None:
            try:
                create_time = psutil.Process(pid).create_time()
            except psutil.NoSuchProcess:
                pass
        return {
            "index": self.index,
            "revision": self.revision,
            "pid": pid,
            "create_time": create_time,
            "port": self.port,
            "gpus": self.gpus,
            "state": self.state,
            "restarts": self.restarts,
            "crash_loop": self.crash_loop,
            "backoff_s": self.backoff_s,
            "last_error": self.last_error,
            "phase": self.phase,
            "last_error_at": self.last_error_at,
            "log": str(self.log_path),
        }


class Supervisor:
    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.replicas: list[Replica] = []
        self.serving_revision: int | None = None
        self.router = Router()
        self.router_address: tuple[str, int] | None = None
        self.rollout: dict[str, Any] = {}
        self.error: str | None = None
        self._server = None
        self._rollout_task: asyncio.Task | None = None
        self._handled_generation = 0
        self._stopping = asyncio.Event()
        self._health = httpx.AsyncClient()
        self._last_status: dict[str, Any] | None = None
        self._next_rotation = 0.0
        self._background: set[asyncio.Task] = set()  # replica restarts under way

    # Replicas.
    def create_replicas(
        self, revision: int, plan: dict[str, Any], slots: list[int] | None = None
    ) -> list[Replica] | None:
        """Start `plan`'s replicas for `revision` (all, or those of `slots`); None when too few GPUs are free."""
        slots = list(range(int(plan.get("replicas", 1)))) if slots is None else slots
        in_use = {g for r in self.replicas for g in (r.gpus or [])}
        assignment = assign_gpus(plan, in_use, len(slots))
        if assignment is None:
            return None
        plan_path = str(self.deployment.plan_path(revision))
        created = []
        for index, gpus in zip(slots, assignment, strict=True):
            port = free_port()
            try:
                argv = replica_command(plan, plan_path, port)
                env = replica_env(plan, gpus)
            except (BackendUnavailable, EnvReferenceError) as e:
                raise RolloutFailed(str(e)) from e
            replica = Replica(
                revision,
                index,
                port,
                gpus,
                argv,
                env,
                self.deployment.replica_log(revision, index),
                health={**HEALTH_DEFAULTS, **(plan.get("health") or {})},
            )
            replica.start()
            log.info(
                "started revision %d replica %d (pid %d, port %d, gpus %s)",
                revision,
                index,
                replica.process.pid,
                port,
                gpus,
            )
            self.replicas.append(replica)
            created.append(replica)
        self.write_status()
        return created

    async def retire(self, replicas: list[Replica]) -> None:
        """Take `replicas` out of the router, let their requests finish, stop them, forget them."""
        for replica in replicas:
            replica.state = "stopping"
        self.publish()
        await asyncio.gather(*(self.router.drain(r.backend, DRAIN_TIMEOUT_S) for r in replicas))
        await asyncio.gather(*(asyncio.to_thread(self._stop, r) for r in replicas))
        self.replicas = [r for r in self.replicas if r not in replicas]
        self.write_status()

    @staticmethod
    def _stop(replica: Replica) -> None:
        if replica.process and replica.process.poll() is None:
            stop_process_group(replica.process.pid)
        if replica.process:
            replica.process.wait()

    def publish(self) -> None:
        """Point the router at the ready replicas of the serving revision (and those a rolling update admitted)."""
        self.router.set_backends(
            [
                r.backend
                for r in self.replicas
                if r.state == "ready" and (r.revision == self.serving_revision or r.admitted)
            ]
        )
        self.write_status()

    # The loop.
    async def run(self) -> int:
        lock = self.deployment.hold_lock()
        if lock is None:
            log.error("another supervisor is running for %s", self.deployment.name)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._stop_leftovers()
        self.write_status()
        try:
            while not self._stopping.is_set():
                await self._tick()
                try:
                    await asyncio.wait_for(self._stopping.wait(), TICK_S)
                except TimeoutError:
                    pass
        finally:
            await self._shutdown()
            os.close(lock)
        return 1 if self.error else 0

    async def _tick(self) -> None:
        self._watch_desired()
        self._watch_exits()
        await self._check_health()
        self._watch_phases()
        self._rotate_logs()

    def _rotate_logs(self) -> None:
        """Keep each log under logfiles.MAX_BYTES (checked every ROTATE_EVERY_S)."""
        now = time.monotonic()
        if now < self._next_rotation:
            return
        self._next_rotation = now + ROTATE_EVERY_S
        rotate_if_large(self.deployment.supervisor_log)
        for replica in self.replicas:
            if rotate_if_large(replica.log_path):
                replica.log_offset = 0  # this attempt's output now starts at the top of the emptied file

    def _watch_phases(self) -> None:
        """Starting replicas' progress into the status file, where `apply` shows it."""
        if any([r.read_phase() for r in self.replicas if r.state == "starting"]):
            self.write_status()

    def _watch_desired(self) -> None:
        if self._rollout_task and not self._rollout_task.done():
            return  # one rollout at a time; a newer request is picked up when this one ends
        desired = self.deployment.desired()
        if not desired or desired["generation"] <= self._handled_generation:
            return
        self._handled_generation = desired["generation"]
        self._rollout_task = asyncio.get_running_loop().create_task(
            self._run_rollout(desired["revision"], desired["generation"])
        )

    async def _run_rollout(self, revision: int, generation: int) -> None:
        self.set_rollout(
            revision, phase="progressing", generation=generation, started_at=time.time(), reason=None, strategy=None
        )
        try:
            plan = self.deployment.plan(revision)
            await self._ensure_router(plan["engine"]["host"], plan["engine"]["port"])
            if revision == self.serving_revision:
                strategy = "none"  # already serving it (e.g. an apply retried after a failed one)
            else:
                strategy = await roll_out(self, revision)
            self.set_rollout(revision, phase="complete", strategy=strategy, finished_at=time.time())
            log.info("revision %d serving (%s)", revision, strategy)
        except (RolloutFailed, PortInUse) as e:
            log.error("rollout of revision %d failed: %s", revision, e)
            self.set_rollout(revision, phase="failed", reason=str(e), finished_at=time.time())
            self._stop_if_nothing_serves(generation, str(e))
        except Exception as e:  # a bug of ours: report it rather than leave the rollout "progressing" forever
            log.exception("rollout of revision %d failed", revision)
            self.set_rollout(revision, phase="failed", reason=f"supervisor error: {e!r}", finished_at=time.time())
            self._stop_if_nothing_serves(generation, f"supervisor error: {e!r}")

    def _stop_if_nothing_serves(self, generation: int, reason: str) -> None:
        """A failed first rollout leaves nothing to supervise: exit, which frees the router's port, unless a newer
        request is waiting."""
        desired = self.deployment.desired() or {}
        if self.serving_revision is None and desired.get("generation", 0) <= generation:
            log.info("nothing serves after the failed rollout; the supervisor stops")
            self.error = f"the first rollout failed: {reason}"
            self._stopping.set()

    async def _ensure_router(self, host: str, port: int) -> None:
        if self.router_address == (host, port):
            return
        sock = bind(host, port)  # raises PortInUse before the old listener is given up
        if self._server is not None:
            self._server.should_exit = True
            await self._server.task
        self._server = await serve(self.router, sock)
        self.router_address = (host, port)
        self.error = None
        log.info("router listening on http://%s:%d", host, port)

    def set_rollout(self, revision: int, **fields: Any) -> None:
        if self.rollout.get("revision") != revision:
            self.rollout = {"revision": revision}
        self.rollout.update(fields)
        self.write_status()

    def _watch_exits(self) -> None:
        now = clock()
        changed = False
        for replica in self.replicas:
            if replica.state in ("stopping", "failed", "restarting"):
                continue
            if replica.state == "crashed":
                if now >= replica.restart_at:
                    replica.restarts += 1
                    replica.start()
                    log.info(
                        "restarted revision %d replica %d (restart %d)",
                        replica.revision,
                        replica.index,
                        replica.restarts,
                    )
                    changed = True
                continue
            if replica.process.poll() is None:
                if replica.state == "ready" and now - replica.ready_since > STABLE_AFTER_S:
                    replica.quick_crashes = 0
                continue
            replica.record_error(replica.failure_reason())
            changed = True
            if not replica.ever_ready:
                replica.state = "failed"  # never came up: the rollout waiting on it reports why
                continue
            replica.schedule_restart(now)
            log.warning(
                "revision %d replica %d exited (%s); restart in %.0fs%s",
                replica.revision,
                replica.index,
                replica.last_error,
                replica.backoff_s,
                " (crash loop)" if replica.crash_loop else "",
            )
        if changed:
            self.publish()

    async def _check_health(self) -> None:
        now = clock()
        due = [
            r
            for r in self.replicas
            if r.state in ("starting", "ready", "unhealthy") and r.process.poll() is None and now >= r.next_health_at
        ]
        if not due:
            return
        problems = await asyncio.gather(*(self._health_problem(r) for r in due))
        changed = False
        for replica, problem in zip(due, problems, strict=True):
            replica.next_health_at = now + (replica.health["interval"] if replica.state == "ready" else TICK_S)
            if problem is None:
                replica.health_failures = 0
                if replica.state != "ready":
                    replica.state, replica.ever_ready, replica.ready_since = "ready", True, now
                    changed = True
            elif replica.state in ("ready", "unhealthy"):
                replica.health_failures += 1
                if replica.state == "ready" and replica.health_failures >= replica.health["failure_threshold"]:
                    replica.state, replica.unhealthy_since = "unhealthy", now
                    replica.record_error(f"unhealthy: {problem}")
                    log.warning("revision %d replica %d unhealthy: %s", replica.revision, replica.index, problem)
                    changed = True
                elif replica.state == "unhealthy" and now - replica.unhealthy_since > self._liveness_s(replica):
                    self._restart_unhealthy(replica, problem, now)
                    changed = True
        if changed:
            self.publish()

    @staticmethod
    def _liveness_s(replica: Replica) -> float:
        return replica.health["failure_threshold"] * replica.health["interval"]

    def _restart_unhealthy(self, replica: Replica, problem: str, now: float) -> None:
        """Liveness: stop the replica (off the loop: it may take the SIGTERM grace) and restart it like a crash."""
        seconds = now - replica.unhealthy_since
        replica.record_error(f"unhealthy for {seconds:.0f}s ({problem}); restarted")
        replica.state = "restarting"
        log.warning("revision %d replica %d %s", replica.revision, replica.index, replica.last_error)

        async def restart() -> None:
            await asyncio.to_thread(self._stop, replica)
            if replica.state == "restarting":  # not retired meanwhile
                replica.schedule_restart(time.monotonic())
                self.write_status()

        self._background.add(task := asyncio.get_running_loop().create_task(restart()))
        task.add_done_callback(self._background.discard)

    async def _health_problem(self, replica: Replica) -> str | None:
        """None when the replica's health check passes, else what went wrong."""
        timeout = replica.health["timeout"] if replica.state == "ready" else 1.0
        url = replica.backend.url + replica.health["path"]
        try:
            reply = await self._health.get(url, timeout=timeout)
        except httpx.TimeoutException:
            return f"GET {replica.health['path']} timed out after {timeout:g}s"
        except httpx.HTTPError as e:
            return f"GET {replica.health['path']} failed: {e!r}"
        return None if reply.status_code == 200 else f"GET {replica.health['path']} answered {reply.status_code}"

    def _stop_leftovers(self) -> None:
        """Stop replicas a previous supervisor recorded and that are somehow still alive (it was killed)."""
        for recorded in self.deployment.status().get("replicas", []):
            if recorded.get("pid") and recorded.get("create_time"):
                stop_process_group(recorded["pid"], create_time=recorded["create_time"])

    async def _shutdown(self) -> None:
        log.info("stopping %d replica(s)", len(self.replicas))
        if self._rollout_task and not self._rollout_task.done():
            self._rollout_task.cancel()
            try:
                await self._rollout_task
            except (asyncio.CancelledError, Exception):
                pass
        await self.retire(list(self.replicas))
        if self._server is not None:
            self._server.should_exit = True
            await self._server.task
        await self.router.aclose()
        await self._health.aclose()
        self.serving_revision = None
        self.write_status(stopped=True)

    # Status.
    def write_status(self, stopped: bool = False) -> None:
        host_port = self.router_address
        status = {
            "name": self.deployment.name,
            "supervisor_pid": None if stopped else os.getpid(),
            "url": f"http://{host_port[0]}:{host_port[1]}" if host_port else None,
            "revision": self.serving_revision,
            "rollout": self.rollout,
            "replicas": [r.to_status() for r in self.replicas],
            "error": self.error,
        }
        if status == self._last_status:
            return
        self._last_status = copy.deepcopy(status)  # self.rollout is mutated in place
        self.deployment.write_status({**status, "updated_at": time.time()})


def start_detached(deployment: Deployment, timeout: float = 30.0) -> int:
    """Start the deployment's supervisor in a new session; returns its pid once it holds the lock."""
    deployment.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(deployment.supervisor_log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "vdeploy.supervisor", deployment.name],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while not deployment.supervisor_alive():
        if process.poll() is not None:
            tail = deployment.supervisor_log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the supervisor exited at start-up: {root_cause(tail, process.returncode)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the supervisor did not start within {timeout:.0f}s; see {deployment.supervisor_log}")
        time.sleep(0.05)
    return process.pid


def run_foreground(deployment: Deployment) -> int:
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    handler.setFormatter(JsonLines() if os.environ.get("VDEPLOY_LOG_FORMAT") == "json" else text)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    return asyncio.run(Supervisor(deployment).run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdeploy.supervisor", description="Supervise one deployment.")
    parser.add_argument("name", help="deployment name (a folder of the state directory)")
    args = parser.parse_args(argv)
    return run_foreground(Deployment(args.name))


if __name__ == "__main__":
    sys.exit(main())
