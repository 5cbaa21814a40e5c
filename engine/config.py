"""EngineConfig: the one contract between the control plane and an engine replica.

The compiler (`vdeploy/compiler.py`) resolves a recipe into an EngineConfig; `LLM(**kwargs)` builds one from keyword
arguments; `python -m vdeploy_engine.server --config plan.json` reads one from JSON. Everything an engine replica needs is here,
and nothing here needs torch, so the control plane can import this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Runner = Literal["generate", "pooling"]
Convert = Literal["none", "embed", "reward", "classify"]
DType = Literal["float16", "bfloat16", "float32"]
Device = Literal["cuda", "cpu"]


DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
DEFAULT_MAX_MODEL_LEN = 2048  # when nothing says more: no plan, or a model whose positions are unknown
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # vdeploy_engine/server/tools.py implements each

# Architectures whose layers the built-in engine can split into pipeline stages (the llama family's decoder and OPT);
# the compiler refuses pipeline_parallel_size > 1 for the others.
PIPELINE_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "OPTForCausalLM",
})

MAX_GRAPH_BATCH = 512  # the largest decode batch captured; bigger batches run eagerly (as in vLLM)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs: 1, 2, 4, then every multiple of 8 (vLLM's schedule). The engine
    captures exactly these and the compiler budgets for exactly these."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    return sorted({b for b in (1, 2, 4) if b <= top} | set(range(8, top + 1, 8)))


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """The decoder layers each pipeline stage holds: consecutive, as even as they divide, the extra ones on the stages
    before the last (which also holds the LM head), as vLLM splits them. The engine builds exactly these and the
    compiler plans each stage's weights and KV cache from them."""
    if num_layers < stages:
        raise ValueError(f"pipeline_parallel_size {stages} is more than the model's {num_layers} layers")
    sizes = [num_layers // stages] * stages
    for i in range(num_layers % stages):
        sizes[-2 - i] += 1
    starts = [sum(sizes[:i]) for i in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class MemoryBudget:
    """The compiler's memory table, per GPU, in bytes (DESIGN.md's memory model): kv_cache = budget - weights -
    activations - cuda_graphs - overhead. The plan shows it; the engine logs what it measures beside it."""

    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    cuda_graph_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int  # whole blocks only
    max_model_len: int
    max_concurrency: float = field(init=False)  # how many max_model_len sequences the KV cache holds at once

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_concurrency", round(self.kv_tokens / self.max_model_len, 2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryBudget:
        return cls(**{k: v for k, v in data.items() if k != "max_concurrency"})


class EngineConfigError(ValueError):
    """A value in an EngineConfig is invalid; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class EngineConfig:
    # What to load.
    model: str  # local HF dir, GGUF file, HF hub id, or modelscope:<id>
    served_model_name: str | None = None  # name clients use; defaults to `model`
    tokenizer: str | None = None  # defaults to the model's own (a GGUF file carries one)
    revision: str | None = None
    download_dir: str | None = None
    trust_remote_code: bool = False
    runner: Runner = "generate"
    convert: Convert = "none"
    dtype: DType = "bfloat16"
    quantization: str | None = None  # None, or gguf / awq / gptq / fp8 ...
    device: Device = "cpu"

    # Parallelism within one replica (data parallelism = replicas, owned by the supervisor).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None (single process), "mp" or "ray"

    # Memory and batching.
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # "auto" = same as dtype
    # KV cache size in bytes. None on CUDA: sized by a profiling pass to gpu_memory_utilization. Required on CPU
    # (the compiler always sets it; LLM(...) defaults it).
    kv_cache_memory_bytes: int | None = None
    swap_space: float = 0.0  # GiB of CPU memory for swapped-out KV blocks; 0 = preempt by recompute
    cpu_offload_gb: float = 0.0

    # Runtime behaviour.
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0

    # Serving.
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # name of the environment variable holding the API key
    chat_template: str | None = None  # a path or an inline Jinja template; None = the model's own
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the parser finds calls in the model's text
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS: the model family's tool call format
    trust_request_chat_template: bool = False  # render chat templates that requests carry (else a 400)
    # Pooling: text put before each embedding input by the request's `input_type` (jina-embeddings-v4's retrieval
    # variants want {"query": "Query: ", "passage": "Passage: "}); /rerank gives the query and documents theirs.
    embedding_prefixes: dict[str, str] | None = None

    # The compiler's memory prediction, logged next to what the engine measures. None when the engine was started
    # without a plan.
    predicted_memory: MemoryBudget | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("model", bool(self.model), "must name a model"),
            ("runner", self.runner in ("generate", "pooling"), "must be 'generate' or 'pooling'"),
            ("convert", self.convert in ("none", "embed", "reward", "classify"), "must be none/embed/reward/classify"),
            ("dtype", self.dtype in ("float16", "bfloat16", "float32"), "must be float16, bfloat16 or float32"),
            ("device", self.device in ("cuda", "cpu"), "must be 'cuda' or 'cpu'"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("pipeline_parallel_size", self.pipeline_parallel_size >= 1, "must be >= 1"),
            (
                "pipeline_parallel_size",
                self.pipeline_parallel_size == 1 or self.runner == "generate",
                "the pooling runner runs the whole model on each rank (use tensor_parallel_size)",
            ),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            ("max_model_len", self.max_model_len >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("block_size", self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "must be a power of two up to 128"),
            ("swap_space", self.swap_space >= 0, "must be >= 0 GiB"),
            ("cpu_offload_gb", self.cpu_offload_gb >= 0, "must be >= 0 GiB"),
            ("port", 0 <= self.port <= 65535, "must be a TCP port (0-65535)"),
            (
                "tool_call_parser",
                self.tool_call_parser in (None, *TOOL_CALL_PARSERS),
                f"must be one of {', '.join(TOOL_CALL_PARSERS)}, got {self.tool_call_parser!r}",
            ),
            (
                "enable_auto_tool_choice",
                not self.enable_auto_tool_choice or self.tool_call_parser is not None,
                "needs tool_call_parser (--tool-call-parser)",
            ),
        ]
        if self.kv_cache_memory_bytes is not None:
            checks.append(("kv_cache_memory_bytes", self.kv_cache_memory_bytes > 0, "must be > 0"))
        if not self.enable_chunked_prefill:
            checks.append(
                (
                    "max_num_batched_tokens",
                    self.max_num_batched_tokens >= self.max_model_len,
                    f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}) "
                    "when chunked prefill is off",
                )
            )
        for name, ok, message in checks:
            if not ok:
                raise EngineConfigError(name, message)

    def prompt_length_error(self, prompt_tokens: int) -> str | None:
        """Why a prompt of this many tokens cannot be served, or None: the one rule of every entry point (LLM(...),
        the server, the pooling runner). A prompt to generate from leaves room for at least one new token."""
        if prompt_tokens == 0:
            return "the prompt is empty"
        room = 1 if self.runner == "generate" else 0
        if prompt_tokens + room > self.max_model_len:
            need = " plus at least one generated token" if room else ""
            return (f"the prompt has {prompt_tokens} tokens, but max_model_len is {self.max_model_len} (this model's "
                    f"maximum context length): the prompt{need} must fit")
        return None

    @property
    def name(self) -> str:
        """The model name clients see."""
        return self.served_model_name or self.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EngineConfigError(unknown[0], "unknown EngineConfig field")
        if isinstance(data.get("predicted_memory"), dict):
            data = {**data, "predicted_memory": MemoryBudget.from_dict(data["predicted_memory"])}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        """Reads an EngineConfig, or a whole plan (`vdeploy plan --format json`) whose `engine` key holds one."""
        data = json.loads(text)
        if "engine" in data and isinstance(data["engine"], dict):
            data = data["engine"]
        return cls.from_dict(data)
