"""`python -m engine.server --config PLAN_OR_ENGINECONFIG.json [--host H] [--port P] [--api-key KEY]`

Starts one engine replica: loads the model, starts the engine loop, then serves HTTP (so `GET /health` answers 200
only once both are up). Start-up decisions and measurements go to stderr; a fatal start-up error ends with one line
`EngineStartupError: <why>` and exit status 1, which the supervisor reports as the replica's root cause.
The API key comes from --api-key, else from the environment variable the config's `api_key_env` names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from engine.config import EngineConfig, EngineConfigError

logger = logging.getLogger("engine.server")


class EngineStartupError(Exception):
    """The replica cannot start; the message says why in one line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="a plan (`vdeploy plan --format json`) or an EngineConfig")
    parser.add_argument("--host", help="overrides the config's host")
    parser.add_argument("--port", type=int, help="overrides the config's port")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on the API routes")
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        config = read_config(args.config)
        if args.host is not None:
            config.host = args.host
        if args.port is not None:
            config.port = args.port
        api_key = args.api_key or api_key_from_env(config)
    except EngineStartupError as error:
        print(f"EngineStartupError: {error}", file=sys.stderr)
        return 1
    return serve(config, api_key)


def read_config(path: str) -> EngineConfig:
    try:
        with open(path, encoding="utf-8") as f:
            return EngineConfig.from_json(f.read())
    except OSError as error:
        raise EngineStartupError(f"cannot read --config {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise EngineStartupError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    except EngineConfigError as error:
        raise EngineStartupError(f"{path}: invalid engine config: {error}") from None
    except (TypeError, AttributeError) as error:  # not an object, or a required field missing
        raise EngineStartupError(f"{path}: not an EngineConfig or plan: {error}") from None


def api_key_from_env(config: EngineConfig) -> str | None:
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise EngineStartupError(f"api_key_env names {config.api_key_env}, but that environment variable is not set")
    return key


def serve(config: EngineConfig, api_key: str | None = None) -> int:
    """Loads the engine for `config` and serves it until interrupted. Returns the exit status."""
    import uvicorn

    from engine.server.app import build_app

    _configure_logging()
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
    try:
        engine = load_engine(config)
    except Exception as error:  # any load failure ends start-up with one line saying why
        logger.debug("start-up failed", exc_info=True)
        print(f"EngineStartupError: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    _log_capacity(config, engine)
    uvicorn.run(build_app(config, engine, api_key), host=config.host, port=config.port, log_level="info")
    return 0


def load_engine(config: EngineConfig) -> Any:
    """The running engine for `config`: a PoolingEngine for runner `pooling`, else an AsyncEngine."""
    if config.runner == "pooling":
        from engine.pooling import PoolingEngine

        return PoolingEngine(config)
    from engine.async_engine import AsyncEngine

    return AsyncEngine(config)


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
        logger.info("plan predicted memory (bytes): %s", json.dumps(config.predicted_memory, sort_keys=True))


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("VDEPLOY_LOG_LEVEL", "INFO"),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


if __name__ == "__main__":
    sys.exit(main())
