"""Every deployment setting, declared once: where it lives in a recipe, which EngineConfig field it becomes, and its
`vllm serve` flag. The compiler's argument paths (`LLM(...)`, `vdeploy serve`), `vdeploy serve`'s flags and the vLLM
renderer's flags are all built from this table; tests/control/test_settings.py checks the recipe model, EngineConfig
and the parsers against it, so a setting added in one place and forgotten in another fails there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vdeploy_engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, TOOL_CALL_PARSERS

Kind = Literal["str", "int", "float", "bool", "switch"]  # switch: --flag / --no-flag (vLLM's BooleanOptionalAction)


@dataclass(frozen=True)
class Setting:
    name: str  # the keyword argument (LLM(...), vLLM's engine arguments) and, where `engine`, the EngineConfig field
    path: str | None  # dotted recipe path; None for an EngineConfig field no recipe holds
    flag: str | None  # the `vllm serve` flag `vdeploy serve` takes; None: not a serve flag (`why` says why)
    kind: Kind = "str"
    help: str = ""
    short: str | None = None  # vLLM's short alias (-tp, -q, ...)
    choices: tuple[str, ...] | None = None
    engine: bool = True  # becomes the EngineConfig field `name`
    vllm: bool = True  # `vllm serve` takes the flag (else the vLLM renderer leaves it out; `why` says why)
    vllm_default: Any = None  # vLLM's default: the renderer leaves out a value equal to it
    why: str = ""


def _s(name: str, section: str | None, flag: str | None, kind: Kind = "str", help: str = "", **extra: Any) -> Setting:
    path = None if section is None else (name if section == "" else f"{section}.{name}")
    return Setting(name, path, flag, kind, help, **extra)


SETTINGS: tuple[Setting, ...] = (
    _s("served_model_name", "", "--served-model-name", help="the model name clients use (default: MODEL)"),
    _s("revision", "", "--revision", help="the model's branch, tag or commit on the hub"),
    _s("trust_remote_code", "", "--trust-remote-code", "bool", help="run the model repository's code"),
    _s("runner", "", "--runner", help="generate (default) or pooling", choices=("auto", "generate", "pooling")),
    _s("convert", "", "--convert", help="what a pooling runner makes of the model",
       choices=("auto", "none", "embed", "reward", "classify")),
    _s("dtype", "", "--dtype", help="auto, half/float16, bfloat16 or float32"),
    _s("quantization", "", "--quantization", short="-q", help="gguf, awq, gptq, fp8 ..."),
    _s("tokenizer", None, "--tokenizer", help="a tokenizer other than the model's own"),
    _s("download_dir", None, "--download-dir", help="where hub downloads go (default: the HF cache)"),
    _s("hardware", "", "--hardware", help="hardware profile name, or auto (default) to detect", engine=False,
       vllm=False, why="vdeploy's hardware profiles; vLLM has no such flag"),
    _s("tensor_parallel_size", "parallelism", "--tensor-parallel-size", "int", "GPUs that split each layer",
       short="-tp", vllm_default=1),
    _s("pipeline_parallel_size", "parallelism", "--pipeline-parallel-size", "int", "GPUs that split the layers",
       short="-pp", vllm_default=1),
    _s("data_parallel_size", "parallelism", None, "int", engine=False, vllm=False,
       why="replicas of a deployment, each its own engine process behind vdeploy's router (vdeploy apply)"),
    _s("distributed_executor_backend", "parallelism", "--distributed-executor-backend", help="how ranks are started",
       choices=("mp", "ray")),
    _s("gpu_memory_utilization", "memory", "--gpu-memory-utilization", "float",
       "fraction of each GPU's memory (of the machine's RAM on a CPU) to use",
       vllm_default=DEFAULT_GPU_MEMORY_UTILIZATION),
    _s("max_model_len", "memory", "--max-model-len", "int", "context length (default: the largest that fits)"),
    _s("max_num_seqs", "memory", "--max-num-seqs", "int", "most sequences in a batch"),
    _s("max_num_batched_tokens", "memory", "--max-num-batched-tokens", "int", "most tokens in one engine step"),
    _s("block_size", "memory", "--block-size", "int", "tokens per KV cache block", vllm_default=16),
    _s("swap_space", "memory", "--swap-space", "float", "GiB of CPU memory for swapped-out KV blocks",
       vllm_default=4),
    _s("cpu_offload_gb", "memory", "--cpu-offload-gb", "float", "GiB of weights to keep in CPU memory",
       vllm_default=0),
    _s("kv_cache_dtype", "memory", "--kv-cache-dtype", help="auto or fp8", vllm_default="auto"),
    _s("kv_cache_memory_bytes", "memory", "--kv-cache-memory-bytes", "int",
       "fix the KV cache size instead of sizing it from the memory budget"),
    _s("enforce_eager", "runtime", "--enforce-eager", "bool", "no CUDA graphs"),
    _s("enable_prefix_caching", "runtime", "--enable-prefix-caching", "switch", "reuse KV blocks of shared prefixes",
       vllm_default=True),
    _s("enable_chunked_prefill", "runtime", "--enable-chunked-prefill", "switch",
       "split long prompts across steps", vllm_default=True),
    _s("seed", "runtime", "--seed", "int", "random seed", vllm_default=0),
    _s("host", "server", "--host", help="address to listen on"),
    _s("port", "server", "--port", "int", "port to listen on"),
    _s("api_key_env", "server", "--api-key-env", help="environment variable that holds the API key", vllm=False,
       why="vLLM reads the key from --api-key or VLLM_API_KEY; the renderer sets the variable instead"),
    _s("chat_template", "server", "--chat-template", help="a Jinja chat template file or inline template"),
    _s("enable_auto_tool_choice", "server", "--enable-auto-tool-choice", "bool",
       "tool_choice auto: the model calls tools on its own (needs --tool-call-parser)"),
    _s("tool_call_parser", "server", "--tool-call-parser", help="the model family's tool call format",
       choices=TOOL_CALL_PARSERS),
    _s("trust_request_chat_template", "server", "--trust-request-chat-template", "bool",
       "render chat templates that requests carry (chat_template_kwargs.chat_template); refused otherwise"),
    _s("embedding_prefixes", "server", None, help="text before each embedding input, by the request's input_type",
       vllm=False, why="vLLM has no such option: its clients write the model's prefixes into the text themselves"),
)

# Recipe fields that only the control plane reads: no EngineConfig field and no serve flag.
CONTROL_PLANE_ONLY: dict[str, str] = {
    "name": "the deployment's name (vdeploy serve derives one from MODEL)",
    "model": "vdeploy serve's positional MODEL",
    "backend": "vdeploy serve always runs the built-in engine",
    "env": "the replica's environment (vdeploy serve inherits the shell's)",
    "health": "the supervisor's probes",
    "rollout": "the supervisor's rollout strategy",
}

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def argument_paths() -> dict[str, tuple[str, ...]]:
    """Keyword argument -> its recipe path, for the settings a recipe holds."""
    return {s.name: tuple(s.path.split(".")) for s in SETTINGS if s.path}


def engine_only_arguments() -> tuple[str, ...]:
    """Keyword arguments that no recipe holds: passed through to the plan's EngineConfig unchanged."""
    return tuple(s.name for s in SETTINGS if s.path is None and s.engine)
