"""The state directory: one folder per deployment holding every revision's plan, the desired revision, status and logs.

Layout under `state_root()`:
    <name>/revisions/<N>/plan.json   the Plan of revision N (never rewritten)
    <name>/desired.json              {"revision": N, "generation": G} written by apply / rollout undo
    <name>/status.json               written by the supervisor: replicas, rollout progress, last error
    <name>/supervisor.lock           held (flock) by the live supervisor; its liveness test
    <name>/logs/                     supervisor.log and one log per replica per revision
    .locks/<name>.lock               held by the CLI command changing the deployment (apply, rollout undo, delete)

Every write goes through `atomic_write` (temp file, fsync, rename), so a crash at any point leaves each file either
old or new, never torn.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

# The parts of a plan that change what runs. Diagnostics and decisions carry recipe line numbers and wording, which
# must not turn an unchanged deployment into a rollout.
RUNTIME_KEYS = ("engine", "replicas", "backend", "env", "health", "rollout", "gpu_count")

COMMAND_LOCK_WAIT_S = 600.0  # how long a command waits for another one changing the same deployment

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class StateError(Exception):
    """The state directory or a deployment in it is missing or unreadable."""


def state_root() -> Path:
    """`$VDEPLOY_STATE_DIR`, else `$XDG_STATE_HOME/vdeploy`, else `~/.local/state/vdeploy`."""
    if override := os.environ.get("VDEPLOY_STATE_DIR"):
        return Path(override)
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "vdeploy"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: unreadable state file ({e})") from e


def fingerprint(plan: dict[str, Any]) -> str:
    """A hash of the parts of a plan that change what runs: equal fingerprints mean nothing to roll out."""
    runtime = {key: plan.get(key) for key in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(runtime, sort_keys=True).encode()).hexdigest()[:16]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StateError(
            f"deployment name {name!r} is not valid: use lowercase letters, digits, '-', '_' or '.' (at most 63)"
        )
    return name


class Deployment:
    """One deployment's folder. Cheap to construct; reads go to disk every time (the supervisor writes concurrently)."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = check_name(name)
        self.root = root or state_root()
        self.dir = self.root / name

    # Paths.
    @property
    def desired_path(self) -> Path:
        return self.dir / "desired.json"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def lock_path(self) -> Path:
        return self.dir / "supervisor.lock"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def plan_path(self, revision: int) -> Path:
        return self.dir / "revisions" / str(revision) / "plan.json"

    def replica_log(self, revision: int, replica: int) -> Path:
        return self.logs_dir / f"rev{revision}-replica{replica}.log"

    @property
    def supervisor_log(self) -> Path:
        return self.logs_dir / "supervisor.log"

    def exists(self) -> bool:
        return self.dir.is_dir()

    @classmethod
    def existing(cls, name: str) -> Deployment:
        """The deployment `name`; StateError when none by that name was applied."""
        deployment = cls(name)
        if not deployment.exists():
            raise StateError(f"no deployment named {name!r}")
        return deployment

    # Revisions.
    def revisions(self) -> list[int]:
        folder = self.dir / "revisions"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "plan.json").exists())

    def plan(self, revision: int) -> dict[str, Any]:
        plan = read_json(self.plan_path(revision))
        if plan is None:
            raise StateError(f"deployment {self.name!r} has no revision {revision}")
        return plan

    def find_revision(self, plan: dict[str, Any]) -> int | None:
        """The newest revision whose plan runs the same thing as `plan`, if any."""
        wanted = fingerprint(plan)
        for revision in reversed(self.revisions()):
            if fingerprint(self.plan(revision)) == wanted:
                return revision
        return None

    def add_revision(self, plan: dict[str, Any]) -> int:
        """Store `plan` as a new revision (numbers only grow, like `kubectl rollout history`)."""
        revision = max(self.revisions(), default=0) + 1
        write_json(self.plan_path(revision), plan)
        return revision

    # Desired state (written by the CLI) and observed state (written by the supervisor).
    def desired(self) -> dict[str, Any] | None:
        return read_json(self.desired_path)

    def request(self, revision: int) -> int:
        """Ask the supervisor to roll out `revision`; returns the request's generation to wait on."""
        generation = ((self.desired() or {}).get("generation") or 0) + 1
        write_json(self.desired_path, {"revision": revision, "generation": generation, "requested_at": time.time()})
        return generation

    def status(self) -> dict[str, Any]:
        return read_json(self.status_path, default={}) or {}

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.status_path, status)

    # Commands that change the deployment (read the live revision, add one, request it, wait) run one at a time: two
    # applies at once both numbered their plan "revision 6" and one change vanished. The lock lives outside the
    # deployment's folder, so that taking it does not make a deployment appear, and dies with its process (flock).
    @contextlib.contextmanager
    def command_lock(
        self, command: str, timeout: float = COMMAND_LOCK_WAIT_S, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        """Hold the deployment's command lock for the block; waits at most `timeout` s for another command (telling
        `on_wait` who holds it), then raises StateError saying which command holds it."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock, owner = FileLock(locks / f"{self.name}.lock"), locks / f"{self.name}.owner"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait(self._lock_owner(owner))
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise StateError(
                    f"deployment {self.name!r} is being changed by {self._lock_owner(owner)}; gave up after "
                    f"{timeout:.0f}s (try again once it finishes)"
                ) from None
        try:
            atomic_write(owner, json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
            yield
        finally:
            lock.release()

    def remove(self) -> None:
        """Delete the deployment's folder and its lock files (called under the command lock, by `delete`)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        locks = self.root / ".locks"
        for path in (locks / f"{self.name}.owner", locks / f"{self.name}.lock"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other deployments' locks remain
            locks.rmdir()

    @staticmethod
    def _lock_owner(owner: Path) -> str:
        try:
            info = json.loads(owner.read_text())
            return f"`vdeploy {info['command']}` (pid {info['pid']})"
        except (OSError, ValueError, KeyError):
            return "another vdeploy command"

    # The supervisor's liveness: it holds an exclusive flock on supervisor.lock for its whole life. A lock, unlike a
    # pid file, dies with its process, so a stale pid can never be mistaken for a live supervisor.
    def hold_lock(self) -> int | None:
        """Take the supervisor lock; returns the open fd to keep, or None when another supervisor holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.set_inheritable(fd, False)
        return fd

    def supervisor_alive(self) -> bool:
        if not self.lock_path.exists():
            return False
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def list_deployments(root: Path | None = None) -> list[Deployment]:
    root = root or state_root()
    if not root.is_dir():
        return []
    return [Deployment(p.name, root) for p in sorted(root.iterdir()) if p.is_dir() and _NAME.match(p.name)]
