"""The `ray` executor: the ranks of the `mp` executor, started as Ray actors that a placement group puts on the
cluster's nodes (one GPU, or one CPU, each), for a replica larger than one machine. The engine's process is rank 0
and the Ray driver: it joins the cluster RAY_ADDRESS names (or starts a local one), reserves a placement group of
one bundle per rank (rank 0's on its own node), and meets the actors in torch.distributed at its own address. On
CUDA, rank 0's GPU is the one Ray gives a placeholder actor in rank 0's bundle, so Ray gives it to no other rank.

Liveness as under `mp`: a rank whose actor ends (its process killed, or an error) or stops answering pings for
HANG_SECONDS ends the engine with an error naming it. The actors are owned by the engine's process, so Ray removes
them when it goes (no orphans).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.distributed.executor import HANG_SECONDS, START_SECONDS, end_engine, free_port, serve_rank

logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.5


class RankActor:
    """One worker rank in a Ray worker process. Two calls may run at once: `serve` for the rank's whole life, and
    `ping`, which the watchdog sends to tell a busy rank from a hung one."""

    def serve(self, rank: int, config_json: str, init_method: str) -> None:
        logging.basicConfig(
            level=os.environ.get("VDEPLOY_LOG_LEVEL", "INFO"),
            format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
        )
        serve_rank(rank, EngineConfig.from_json(config_json), init_method)

    def ping(self) -> int:
        return os.getpid()

    def gpu(self) -> int:
        """The GPU Ray gave this actor (rank 0's placeholder reserves rank 0's GPU this way)."""
        import ray

        return int(ray.get_gpu_ids()[0])


class RayExecutor:
    def __init__(self, config: EngineConfig):
        try:
            import ray
        except ModuleNotFoundError:
            raise RuntimeError(
                "distributed_executor_backend: ray needs the ray package on the engine's host "
                "(pip install 'vdeploy[ray]'), or use distributed_executor_backend: mp on one host"
            ) from None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from vdeploy_engine.distributed.parallel import init_world

        self._ray = ray
        self._placeholder: Any = None
        ray.init(ignore_reinit_error=True)  # RAY_ADDRESS, if set, names the cluster
        size = config.tensor_parallel_size * config.pipeline_parallel_size
        per_rank = {"GPU": 1} if config.device == "cuda" else {"CPU": 1}
        host = ray.util.get_node_ip_address()
        # Bundle r is rank r's; rank 0's stays on this node (Ray's per-node resource), where this process runs it.
        bundles = [{**per_rank, f"node:{host}": 0.001}] + [per_rank] * (size - 1)
        self.group = placement_group(bundles, strategy="PACK")
        while not self.group.wait(START_SECONDS):
            room = (f"the Ray cluster has no room for {size} ranks of one {next(iter(per_rank))} each (rank 0 on "
                    f"this node) after {START_SECONDS:.0f} s (cluster resources: {ray.cluster_resources()})")
            if not os.environ.get("RAY_ADDRESS"):  # a cluster of this machine alone: no node will join
                ray.util.remove_placement_group(self.group)
                raise RuntimeError(room)
            logger.warning("%s; waiting for more nodes to join", room)  # worker pods may still be starting
        init_method = f"tcp://{host}:{free_port(host)}"
        actor = ray.remote(RankActor)

        def place(rank: int) -> Any:
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)
            return actor.options(num_cpus=per_rank.get("CPU", 0), num_gpus=per_rank.get("GPU", 0),
                                 max_concurrency=2, scheduling_strategy=strategy).remote()

        gpu = None
        if config.device == "cuda":  # a placeholder holds rank 0's GPU, so that no actor is given the same one
            self._placeholder = place(0)
            gpu = ray.get(self._placeholder.gpu.remote(), timeout=START_SECONDS)
        self.actors: dict[int, Any] = {rank: place(rank) for rank in range(1, size)}
        self._runs = {rank: a.serve.remote(rank, config.to_json(), init_method) for rank, a in self.actors.items()}
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="rank-watchdog", daemon=True).start()
        atexit.register(self.shutdown)
        self.world = init_world(0, config.tensor_parallel_size, config.pipeline_parallel_size, config.device,
                                init_method, gpu)

    def shutdown(self) -> None:
        """Tells the ranks to stop, waits for them, and frees their placement group."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        import torch.distributed as dist

        ray = self._ray
        try:
            self.world.broadcast(None)
            ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=10)
        finally:
            for actor in [*self.actors.values(), *([self._placeholder] if self._placeholder else [])]:
                ray.kill(actor)
            ray.util.remove_placement_group(self.group)
            dist.destroy_process_group()

    def _watch(self) -> None:
        ray = self._ray
        started = time.monotonic()
        pings = {rank: (actor.ping.remote(), started) for rank, actor in self.actors.items()}
        pids: dict[int, int] = {}
        while not self._stopping.is_set():
            ended, _ = ray.wait(list(self._runs.values()), timeout=_POLL_SECONDS)
            if self._stopping.is_set():
                return
            for rank, run in self._runs.items():
                if run in ended:
                    self._fail(f"rank {rank} (ray actor, pid {pids.get(rank, '?')}) exited: {_why(ray, run)}")
            now = time.monotonic()
            for rank, (ping, sent) in pings.items():
                if ray.wait([ping], timeout=0)[0]:
                    pids[rank] = ray.get(ping)
                    pings[rank] = (self.actors[rank].ping.remote(), now)
                elif now - sent > (HANG_SECONDS if rank in pids else START_SECONDS):
                    self._fail(f"rank {rank} (ray actor, pid {pids.get(rank, '?')}) stopped responding "
                               f"(no answer to a ping for {now - sent:.0f} s)")

    def _fail(self, problem: str) -> None:
        end_engine(problem, lambda: [self._ray.kill(actor) for actor in self.actors.values()])


def _why(ray: Any, run: Any) -> str:
    try:
        ray.get(run)
    except Exception as exc:  # the actor's error, or that its process died
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
    return "it returned before the engine stopped"
