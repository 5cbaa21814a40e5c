"""The plan's EngineConfig as `vllm serve` flags. Only flags vLLM's `serve` accepts (names from vLLM's engine-argument
docs); settings equal to vLLM's defaults are left out so the command reads like one a person would write."""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

# (EngineConfig field, vLLM flag, vLLM's default). A value equal to the default is not rendered.
_VALUE_FLAGS: list[tuple[str, str, Any]] = [
    ("served_model_name", "--served-model-name", None),
    ("tokenizer", "--tokenizer", None),
    ("revision", "--revision", None),
    ("download_dir", "--download-dir", None),
    ("dtype", "--dtype", None),  # always explicit: vLLM's "auto" may pick bf16, which SM75 cannot run
    ("quantization", "--quantization", None),
    ("tensor_parallel_size", "--tensor-parallel-size", 1),
    ("pipeline_parallel_size", "--pipeline-parallel-size", 1),
    ("distributed_executor_backend", "--distributed-executor-backend", None),
    ("max_model_len", "--max-model-len", None),
    ("max_num_seqs", "--max-num-seqs", None),
    ("max_num_batched_tokens", "--max-num-batched-tokens", None),
    ("gpu_memory_utilization", "--gpu-memory-utilization", 0.9),
    ("block_size", "--block-size", 16),
    ("kv_cache_dtype", "--kv-cache-dtype", "auto"),
    ("swap_space", "--swap-space", 4),
    ("cpu_offload_gb", "--cpu-offload-gb", 0),
    ("seed", "--seed", 0),
    ("chat_template", "--chat-template", None),
]


def executable() -> str | None:
    """The `vllm` command, or None when vLLM is not installed."""
    found = shutil.which("vllm")
    if found is None and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return found


def argv(engine: dict[str, Any], host: str | None = None, port: int | None = None) -> list[str]:
    """`vllm serve MODEL ...` for an EngineConfig given as a dict (`Plan.engine` serialised)."""
    args = ["vllm", "serve", engine["model"]]
    for field, flag, default in _VALUE_FLAGS:
        value = engine.get(field)
        if value is None or value == default:
            continue
        args += [flag, _format(value)]
    if engine.get("runner", "generate") != "generate":
        args += ["--runner", engine["runner"]]
    if engine.get("convert", "none") not in ("none", "auto"):
        args += ["--convert", engine["convert"]]
    if engine.get("trust_remote_code"):
        args.append("--trust-remote-code")
    if engine.get("enforce_eager"):
        args.append("--enforce-eager")
    if not engine.get("enable_prefix_caching", True):
        args.append("--no-enable-prefix-caching")
    if not engine.get("enable_chunked_prefill", True):
        args.append("--no-enable-chunked-prefill")
    args += ["--host", host or engine.get("host", "127.0.0.1"), "--port", str(port or engine.get("port", 8000))]
    return args


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
