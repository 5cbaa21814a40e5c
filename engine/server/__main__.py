"""`python -m vdeploy_engine.server --config PLAN_OR_ENGINECONFIG.json [--host H] [--port P] [--api-key KEY]`

Starts one engine replica: loads the model, starts the engine loop, then serves HTTP (so `GET /health` answers 200
only once both are up). Start-up decisions and measurements go to stderr; a fatal start-up error ends with one line
`EngineStartupError: <why>` and exit status 1, which the supervisor reports as the replica's root cause.
The API key comes from --api-key, else from the environment variable the config's `api_key_env` names, else from
VLLM_API_KEY (as vLLM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from vdeploy_engine.config import EngineConfig, EngineConfigError
from vdeploy_engine.server.launch import EngineStartupError, api_key_from_env, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdeploy_engine.server", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="a plan (`vdeploy plan --format json`) or an EngineConfig")
    parser.add_argument("--host", help="overrides the config's host")
    parser.add_argument("--port", type=int, help="overrides the config's port")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on the API routes")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        config = dataclasses.replace(config, **overrides)  # validated again
        api_key = args.api_key or api_key_from_env(config)
    except (EngineConfigError, EngineStartupError) as error:
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


if __name__ == "__main__":
    sys.exit(main())
