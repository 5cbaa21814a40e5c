"""Rollouts: bring up a revision's replicas, switch the router once they are ready, drain and stop the old ones.

Also the root cause of a failed replica, dug out of its log: a person reading `vdeploy apply`'s output should learn
"CUDA out of memory", not "initialization failed".
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdeploy.supervisor import Replica, Supervisor

log = logging.getLogger("vdeploy.rollout")

# Ordered: the first pattern found anywhere in the log's tail wins, so specific causes come before generic ones.
# Each message may use the pattern's named groups.
_CAUSES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"(CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED)"),
        "CUDA out of memory: lower memory.gpu_memory_utilization, max_model_len or max_num_seqs, or quantize",
    ),
    (
        re.compile(
            r"(Bfloat16 is only supported on GPUs with compute capability|bf16.*(not supported|SM ?7\.?5))", re.I
        ),
        "bfloat16 is not supported by this GPU (compute capability < 8.0, e.g. T4): set dtype: float16",
    ),
    (
        re.compile(
            r"(?P<what>[Aa]rchitectures?\b.{0,80}?) (is|are) not supported|[Uu]nsupported (model )?architecture[: ]+(?P<arch>\S+)"
        ),
        "model architecture not supported: {what}{arch}",
    ),
    (
        re.compile(r"\[Errno 98\][^\n]*|[Aa]ddress already in use"),
        "port already in use: another process is listening on the replica's port",
    ),
    (
        re.compile(r"(FileNotFoundError|No such file or directory)[^\n]*?'(?P<path>[^']+)'"),
        "model or file not found: {path}",
    ),
    (
        re.compile(r"(Repository Not Found|is not a local folder and is not a valid model identifier)[^\n]*"),
        "model not found (not a local path and not on the model hub): check `model`",
    ),
    (
        re.compile(r"No module named '(?P<module>[^']+)'"),
        "missing Python package: {module} (install it on the machine that runs the replica)",
    ),
    (
        re.compile(r"DefaultCPUAllocator: can't allocate memory[^\n]*|Cannot allocate memory"),
        "out of host memory: lower the KV cache (memory.max_model_len, max_num_seqs) or free RAM",
    ),
    (
        re.compile(r"(not enough memory|insufficient memory|No available memory for the cache blocks)[^\n]*", re.I),
        "not enough memory for the KV cache: lower max_model_len or max_num_seqs, or raise gpu_memory_utilization",
    ),
]
# The last line of a Python traceback: `SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<line>\w*(Error|Exception|Exit)\b.*)$", re.M)


def root_cause(log_text: str, returncode: int | None = None) -> str:
    """One line saying why a replica failed, from the tail of its log and its exit status."""
    tail = log_text[-20000:]
    for pattern, message in _CAUSES:
        match = pattern.search(tail)
        if match:
            groups = {k: v or "" for k, v in match.groupdict().items()}
            return message.format(**groups)
    exceptions = _EXCEPTION_LINE.findall(tail)
    if exceptions:
        return exceptions[-1][0].strip()[:300]
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (killed by the kernel's OOM killer?)" if returncode == -signal.SIGKILL else ""
        return f"replica killed by {name}{hint}"
    if returncode is not None:
        return f"replica exited with status {returncode} and no error in its log"
    return "replica did not become ready (no error in its log)"


def parse_duration(value: Any, default: float) -> float:
    """Seconds from 300, 300.0, "300", "300s", "5m" or "1h"."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. 90s, 5m, 1h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def readiness_timeout(plan: dict[str, Any]) -> float:
    """How long a new revision may take to become ready: the tighter of rollout.timeout and health.startup_timeout."""
    rollout = parse_duration((plan.get("rollout") or {}).get("timeout"), default=1200.0)
    startup = parse_duration((plan.get("health") or {}).get("startup_timeout"), default=rollout)
    return min(rollout, startup)


class RolloutFailed(Exception):
    """The new revision could not become ready; the message is the root cause."""


async def roll_out(supervisor: Supervisor, revision: int) -> str:
    """Make `revision` the serving one; returns the strategy used, raises RolloutFailed with the root cause.

    `blue_green` starts every new replica next to the old ones and switches the router once all are ready. `rolling`
    (and `blue_green` when the GPUs cannot hold both sets) replaces one replica at a time. Either way the old revision
    serves until the new one is ready, and a failure puts back what was taken away. With nothing serving yet, all
    replicas start at once.
    """
    plan = supervisor.deployment.plan(revision)
    timeout = readiness_timeout(plan)
    old = [r for r in supervisor.replicas if r.revision != revision]
    first = supervisor.serving_revision is None
    if first or (plan.get("rollout") or {}).get("strategy") == "blue_green":
        new = supervisor.create_replicas(revision, plan)
        if new is not None:
            supervisor.set_rollout(revision, strategy="all at once" if first else "blue_green")
            try:
                await wait_ready(supervisor, new, timeout)
            except RolloutFailed:
                await supervisor.retire(new)
                raise
            await _switch(supervisor, revision, old)
            return supervisor.rollout["strategy"]
    supervisor.set_rollout(revision, strategy="rolling")
    await _one_at_a_time(supervisor, revision, plan, old, timeout)
    return "rolling"


async def _one_at_a_time(
    supervisor: Supervisor, revision: int, plan: dict[str, Any], old: list[Replica], timeout: float
) -> None:
    """For each replica slot: start the new replica (first stopping the slot's old one only when the GPUs are full),
    wait until it is ready, let the router use it, then stop the slot's old replica."""
    old_revision = supervisor.serving_revision
    old_by_slot = {r.index: r for r in old if r.revision == old_revision}
    started: list[Replica] = []
    emptied: list[int] = []  # slots whose old replica is gone

    async def empty(slot: int) -> None:
        if slot in old_by_slot:
            await supervisor.retire([old_by_slot.pop(slot)])
            emptied.append(slot)

    try:
        for slot in range(int(plan.get("replicas", 1))):
            new = supervisor.create_replicas(revision, plan, slots=[slot])
            if new is None:
                await empty(slot)
                new = supervisor.create_replicas(revision, plan, slots=[slot])
            if new is None:
                raise RolloutFailed(f"revision {revision} needs more GPUs than the host's {plan.get('gpu_count', 0)}")
            started += new
            await wait_ready(supervisor, new, timeout)
            for replica in new:
                replica.admitted = True  # serves next to the old revision from now on
            supervisor.publish()
            log.info("revision %d replica %d serving", revision, slot)
            await empty(slot)
    except RolloutFailed:
        await supervisor.retire(started)
        if emptied and old_revision is not None:
            restored = supervisor.create_replicas(old_revision, supervisor.deployment.plan(old_revision), slots=emptied)
            if restored:
                await wait_ready(supervisor, restored, timeout)
        raise
    await _switch(supervisor, revision, [r for r in old if r in supervisor.replicas])


async def _switch(supervisor: Supervisor, revision: int, old: list[Replica]) -> None:
    """Route to `revision` only, then drain and stop the `old` replicas."""
    supervisor.serving_revision = revision
    supervisor.publish()
    await supervisor.retire(old)


async def wait_ready(supervisor: Supervisor, replicas: list[Replica], timeout: float) -> None:
    """Wait until every replica answers its health check; a crash or the timeout raises RolloutFailed."""
    deadline = time.monotonic() + timeout
    while True:
        for replica in replicas:
            if replica.process.poll() is not None:
                raise RolloutFailed(replica.failure_reason())
        if all(r.state == "ready" for r in replicas):
            return
        if time.monotonic() > deadline:
            slow = next(r for r in replicas if r.state != "ready")
            cause = root_cause(slow.log_tail()) if slow.log_tail() else "no output in its log"
            raise RolloutFailed(f"replica {slow.index} not ready after {timeout:.0f}s (rollout.timeout); log: {cause}")
        await asyncio.sleep(0.2)


# The CLI's side of a rollout: what would change, and waiting for the supervisor to finish.


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each runtime setting that differs (empty: nothing to roll out)."""
    from vdeploy.state import RUNTIME_KEYS

    if old is None:
        return ["new deployment"]
    before, after = _flatten({k: old.get(k) for k in RUNTIME_KEYS}), _flatten({k: new.get(k) for k in RUNTIME_KEYS})
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def live_plan(deployment) -> dict[str, Any] | None:
    """The plan of the revision the deployment's supervisor is serving, or None when nothing is."""
    if not deployment.supervisor_alive():
        return None
    revision = deployment.status().get("revision")
    return deployment.plan(revision) if revision is not None else None


def pending_changes(plan: dict[str, Any]) -> list[str]:
    """What `vdeploy apply` would change for `plan` (JSON data); empty when nothing."""
    from vdeploy.state import Deployment

    return changes(live_plan(Deployment(plan["name"])), plan)


def wait_for_rollout(
    deployment, generation: int, timeout: float, on_status: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Wait for the supervisor to finish request `generation`; returns its rollout record (`phase` is complete,
    failed, superseded or timeout). `on_status` sees each status read on the way (progress for a person)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = deployment.supervisor_alive()
        status = deployment.status()
        if on_status is not None:
            on_status(status)
        rollout = dict(status.get("rollout") or {})
        if (rollout.get("generation") or 0) > generation:
            return {**rollout, "phase": "superseded", "reason": "a newer apply replaced this request"}
        if rollout.get("generation") == generation and rollout.get("phase") in ("complete", "failed"):
            return rollout
        if not alive:
            reason = status.get("error") or _supervisor_exit_reason(deployment)
            return {**rollout, "phase": "failed", "reason": f"the supervisor exited: {reason}"}
        if time.monotonic() > deadline:
            return {**rollout, "phase": "timeout", "reason": f"not ready after {timeout:.0f}s; still rolling out"}
        time.sleep(0.2)


def _supervisor_exit_reason(deployment) -> str:
    try:
        tail = deployment.supervisor_log.read_text(errors="replace")[-8000:]
    except FileNotFoundError:
        return "no supervisor log"
    return root_cause(tail)
