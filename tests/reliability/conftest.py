"""Fixtures of the reliability suite: an engine on the tiny random Llama, and a real server process over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apply.conftest import state_dir  # noqa: F401 - a private state directory, for the state tests
from tests.server.conftest import RunningServer, run_server, write_config

SERVED_NAME = "tiny"


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir: Path):
    import torch

    from vdeploy_engine import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is all synchronisation overhead with several threads
    yield LLM(str(tiny_llama_dir), dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20)
    torch.set_num_threads(threads)


def tiny_server_config(path: Path, model_dir: Path) -> Path:
    """An EngineConfig for `python -m vdeploy_engine.server` on the tiny model (float32, CPU, small KV cache)."""
    return write_config(
        path,
        model=str(model_dir),
        served_model_name=SERVED_NAME,
        dtype="float32",
        max_model_len=256,
        block_size=16,
        kv_cache_memory_bytes=4 << 20,
    )


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    root = tmp_path_factory.mktemp("tiny-server")
    config = tiny_server_config(root / "config.json", tiny_llama_dir)
    with run_server(["-m", "vdeploy_engine.server", "--config", str(config)], root / "server.log") as server:
        yield server
