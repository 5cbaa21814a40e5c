"""The `mp` executor: one engine replica as several processes on one host. The engine's process is rank 0; it spawns
ranks 1..N-1, each of which loads its slice of the model and then runs whatever rank 0 sends (see World).

A replica is only as alive as its least alive rank. Each worker writes a heartbeat byte to a pipe twice a second,
and a watchdog thread in rank 0 reads them: a rank that exits, or whose heartbeat stops for HANG_SECONDS (a stopped or
wedged process), ends the whole engine at once with an error naming the rank, since the other ranks would otherwise
wait for it forever inside a collective; the supervisor restarts the replica. A worker exits by itself when rank 0
goes away (its parent changes, or the pipe closes), so none outlives its engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vdeploy_engine.config import EngineConfig

logger = logging.getLogger(__name__)

HANG_SECONDS = 10.0  # a rank silent this long is hung
START_SECONDS = 60.0  # a new rank has this long to send its first heartbeat (before it imports torch)
_POLL_SECONDS = 0.5


def start_executor(config: EngineConfig) -> Any:
    """The worker ranks for `config` (an executor with `world` and `shutdown()`); None when the model runs in this
    process alone."""
    if config.tensor_parallel_size * config.pipeline_parallel_size == 1:
        return None
    if config.distributed_executor_backend == "ray":
        from vdeploy_engine.distributed.ray_executor import RayExecutor

        return RayExecutor(config)
    return MPExecutor(config)


class MPExecutor:
    """Starts the worker ranks and watches them; `world` is rank 0's place among them."""

    def __init__(self, config: EngineConfig):
        from vdeploy_engine.distributed.parallel import init_world

        size = config.tensor_parallel_size * config.pipeline_parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        # A fresh interpreter per rank (not multiprocessing's spawn, which re-imports the caller's main script).
        self.workers: dict[int, subprocess.Popen] = {}
        self._beats: dict[int, int] = {}  # rank -> read end of its heartbeat pipe
        for rank in range(1, size):
            read, write = os.pipe()
            command = [sys.executable, "-m", __name__, str(rank), init_method, str(write), str(os.getpid())]
            self.workers[rank] = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(write,))
            os.close(write)
            os.set_blocking(read, False)
            self._beats[rank] = read
            self.workers[rank].stdin.write(config.to_json().encode())
            self.workers[rank].stdin.close()
        self._started = time.monotonic()
        self._last_beat = dict.fromkeys(self.workers, 0.0)
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="rank-watchdog", daemon=True).start()
        atexit.register(self.shutdown)
        self.world = init_world(0, config.tensor_parallel_size, config.pipeline_parallel_size, config.device,
                                init_method)

    def shutdown(self) -> None:
        """Tells the workers to exit and waits for them (killing any that do not)."""
        if self._stopping.is_set():
            return
        problem = self._problem(time.monotonic())
        if problem:  # a collective failed for a lost rank before the watchdog saw it: say which rank
            self._fail(problem)
        self._stopping.set()
        import torch.distributed as dist

        try:
            self.world.broadcast(None)
        finally:
            for worker in self.workers.values():
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
            dist.destroy_process_group()
            for read in self._beats.values():
                os.close(read)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select(list(self._beats.values()), [], [], _POLL_SECONDS)
            now = time.monotonic()
            for rank, read in self._beats.items():
                if read in ready and os.read(read, 4096):
                    self._last_beat[rank] = now
            problem = self._problem(now)
            if problem and not self._stopping.is_set():
                self._fail(problem)

    def _problem(self, now: float) -> str | None:
        for rank, worker in self.workers.items():
            if worker.poll() is not None:
                return f"rank {rank} (pid {worker.pid}) exited with code {worker.returncode}"
            beat = self._last_beat[rank]
            if not beat and now - self._started > START_SECONDS:
                return f"rank {rank} (pid {worker.pid}) did not start within {START_SECONDS:.0f} s"
            if beat and now - beat > HANG_SECONDS:
                return f"rank {rank} (pid {worker.pid}) stopped responding (no heartbeat for {now - beat:.0f} s)"
        return None

    def _fail(self, problem: str) -> None:
        end_engine(problem, lambda: [worker.kill() for worker in self.workers.values()])


def end_engine(problem: str, stop_ranks: Callable[[], object]) -> None:
    """Ends the engine for a lost rank: rank 0 may be blocked in a collective that will never complete, so no cleaner
    way out."""
    message = f"parallel engine: {problem}; stopping the engine and its other ranks"
    logger.error(message)
    # Straight to the file descriptor: torch.distributed's excepthook swaps sys.stderr for a buffer while it formats
    # a failed collective's traceback in the main thread, which may be this very moment.
    os.write(2, f"ERROR {message}\n".encode())
    stop_ranks()
    os._exit(1)


def worker_main(rank: int, init_method: str, heartbeat_fd: int, parent_pid: int) -> None:
    """A worker rank: heartbeat, join the group, load this rank's slice of the model, then run rank 0's messages."""
    threading.Thread(target=_heartbeat, args=(heartbeat_fd, parent_pid), name="heartbeat", daemon=True).start()
    logging.basicConfig(  # each rank logs what it measured at start-up beside the plan's prediction
        level=os.environ.get("VDEPLOY_LOG_LEVEL", "INFO"), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
    )
    try:
        serve_rank(rank, EngineConfig.from_json(sys.stdin.read()), init_method)
    except BaseException as exc:  # the watchdog in rank 0 reports the exit; say why here
        print(f"ERROR rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


def serve_rank(rank: int, config: EngineConfig, init_method: str) -> None:
    """Joins the group, loads this rank's part of the model, then runs rank 0's messages until it says stop."""
    from vdeploy_engine.distributed.parallel import init_world

    world = init_world(rank, config.tensor_parallel_size, config.pipeline_parallel_size, config.device, init_method)
    runner = build_runner(config, world)
    while (message := world.receive()) is not None:
        method, args = message
        getattr(runner, method)(*args)


def build_runner(config: EngineConfig, world: Any) -> Any:
    """The object whose methods rank 0's messages name: the model runner (generate) or the pooling runner."""
    import torch

    from vdeploy_engine.layers.linear import process_weights_after_loading
    from vdeploy_engine.loader import load_hf_config, load_model

    torch.manual_seed(config.seed)
    hf_config = load_hf_config(config)
    model = load_model(config, hf_config, world.tp, world.stage)
    process_weights_after_loading(model)
    if config.runner == "pooling":
        from vdeploy_engine.pooling import PoolingRunner

        return PoolingRunner(config, model, world)
    from vdeploy_engine.worker.model_runner import ModelRunner

    return ModelRunner(config, model, world)


def _heartbeat(fd: int, parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # rank 0 is gone: leave no orphan behind
            os._exit(1)
        try:
            os.write(fd, b".")
        except OSError:  # rank 0 closed its end
            os._exit(1)
        time.sleep(_POLL_SECONDS)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
