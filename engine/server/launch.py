"""Starting a replica in this process: load the engine, log what was decided and measured, serve HTTP."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from vdeploy_engine import progress
from vdeploy_engine.config import EngineConfig

logger = logging.getLogger("vdeploy_engine.server")

FATAL_EXIT_GRACE_S = 15.0  # after the engine dies, the seconds uvicorn has to answer the failed requests and stop


class EngineStartupError(Exception):
    """The replica cannot start; the message says why in one line."""


def api_key_from_env(config: EngineConfig) -> str | None:
    """The key in the environment variable the config's `api_key_env` names; without one, VLLM_API_KEY's, as
    `vllm serve` reads it (None when that is unset or empty)."""
    if config.api_key_env is None:
        return os.environ.get("VLLM_API_KEY") or None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise EngineStartupError(f"api_key_env names {config.api_key_env}, but that environment variable is not set")
    return key


def serve(config: EngineConfig, api_key: str | None = None) -> int:
    """Loads the engine for `config` and serves it until interrupted or until the engine dies (a device fault: the
    process exits with status 1 and one line `EngineDeadError: <why>`, so the supervisor restarts it). Returns the
    exit status."""
    import uvicorn

    from vdeploy_engine.server.app import build_app

    _configure_logging()
    if not sys.stderr.isatty():  # a log a supervisor reads: phases as `vdeploy-phase` lines, not progress bars
        progress.use_events()
    logger.info(
        "starting %s (%s runner) on %s:%d: model %s, dtype %s, device %s, max_model_len %d, max_num_seqs %d, "
        "max_num_batched_tokens %d, API key %s",
        config.name,
        config.runner,
        config.host,
        config.port,
        config.model,
        config.dtype,
        config.device,
        config.max_model_len,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        "required" if api_key else "not required",
    )
    fatal: list[BaseException] = []

    def stop_serving(error: BaseException) -> None:
        """The engine loop died: stop uvicorn (its SIGTERM handler lets the failed requests answer first), and exit
        outright if that takes too long."""
        fatal.append(error)
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(FATAL_EXIT_GRACE_S, os._exit, (1,)).start()

    try:
        engine = load_engine(config, stop_serving)
    except Exception as error:  # any load failure ends start-up with one line saying why
        logger.debug("start-up failed", exc_info=True)
        print(f"EngineStartupError: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    _log_capacity(config, engine)
    progress.phase("serving", port=config.port)  # the HTTP server starts; /health answers once it listens
    app = build_app(config, engine, api_key)
    # JSON logs: uvicorn's loggers go through the root handler above instead of its own text format.
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", log_config=None if json_logs() else
                uvicorn.config.LOGGING_CONFIG)
    if fatal:
        print(f"EngineDeadError: {type(fatal[0]).__name__}: {fatal[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def load_engine(config: EngineConfig, on_fatal: Callable[[BaseException], None] | None = None) -> Any:
    """The running engine for `config`: a PoolingEngine for runner `pooling`, else an AsyncEngine (which calls
    `on_fatal` if its loop dies)."""
    if config.runner == "pooling":
        from vdeploy_engine.pooling import PoolingEngine

        return PoolingEngine(config)
    from vdeploy_engine.async_engine import AsyncEngine

    return AsyncEngine(config, on_fatal=on_fatal)


def _log_capacity(config: EngineConfig, engine: Any) -> None:
    stats = engine.stats()
    if stats.kv_blocks_total:
        kv_tokens = stats.kv_blocks_total * config.block_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens; max concurrency %.2fx at max_model_len %d",
            stats.kv_blocks_total,
            config.block_size,
            kv_tokens,
            kv_tokens / config.max_model_len,
            config.max_model_len,
        )
    if config.predicted_memory:
        predicted = dataclasses.asdict(config.predicted_memory)
        logger.info("plan predicted memory (bytes): %s", json.dumps(predicted, sort_keys=True))


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLines() if json_logs() else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=os.environ.get("VDEPLOY_LOG_LEVEL", "INFO"), handlers=[handler])


def json_logs() -> bool:
    return os.environ.get("VDEPLOY_LOG_FORMAT") == "json"


class JsonLines(logging.Formatter):
    """VDEPLOY_LOG_FORMAT=json: one JSON object a line for log collectors. vdeploy/logfiles.py has the supervisor's
    twin (the engine and the control plane share no code but the EngineConfig contract)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
