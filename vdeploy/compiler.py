"""The compiler: recipe + hardware profile + model facts -> Plan. Every engine setting is decided here, with its reason.

`compile()` is pure (no I/O, no clock, no torch): the same inputs give the same Plan. The functions after it are the
front door that does the I/O first: `plan_recipe` (a loaded recipe: detect hardware, read model facts, compile) and
`plan_from_args` (vLLM-style keyword arguments, for `vdeploy serve` and `LLM(...)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from typing import Any

from vdeploy import memory as mem
from vdeploy import settings
from vdeploy.diagnostics import Diagnostic, error, format_text, has_errors, info, warning
from vdeploy.modelinfo import ModelFacts, resolve_model
from vdeploy.plan import Decision, Plan
from vdeploy.profiles import HardwareProfile, ProfileError, detect, detected_profile, load_profile
from vdeploy.recipe import Recipe, SourceMap, validate_recipe
from vdeploy_engine.config import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_MODEL_LEN,
    PIPELINE_ARCHITECTURES,
    EngineConfig,
    EngineConfigError,
    MemoryBudget,
)

GiB = mem.GiB
logger = logging.getLogger(__name__)

CPU_KV_SHARE_WITHOUT_FACTS = 0.5  # share of the CPU budget given to the KV cache when the weights' size is unknown
DTYPE_NAMES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float": "float32", "float32": "float32"}
# Minimum compute capability of each quantization's GPU kernels (vLLM's figures).
QUANT_MIN_CAPABILITY = {"awq": 7.5, "awq_marlin": 8.0, "gptq": 6.0, "gptq_marlin": 8.0, "gguf": 6.0, "fp8": 8.9,
                        "bitsandbytes": 7.0}
# Checkpoint formats a `quantization` setting can read; fp8 and bitsandbytes also quantize plain weights at load.
QUANT_CHECKPOINTS = {"awq": {"awq"}, "awq_marlin": {"awq"}, "gptq": {"gptq"}, "gptq_marlin": {"gptq"},
                     "gguf": {"gguf"}, "fp8": {"fp8", None}, "bitsandbytes": {"bitsandbytes", None}}
_INT4 = ("awq", "gptq")


class PlanError(Exception):
    """A deployment that cannot work as asked; `diagnostics` are all the findings, errors first."""

    def __init__(self, diagnostics: list[Diagnostic]):
        order = {"error": 0, "warning": 1, "info": 2}
        self.diagnostics = sorted(diagnostics, key=lambda d: order[d.severity])
        super().__init__(format_text(d for d in self.diagnostics if d.severity == "error"))


def compile(recipe: Recipe, profile: HardwareProfile, facts: ModelFacts | None) -> Plan:
    """Resolve a recipe for a profile (whose `gpu_count` is the host's) and a model. Pure."""
    return _Compiler(recipe, profile, facts).run()


class _Compiler:
    def __init__(self, recipe: Recipe, profile: HardwareProfile, facts: ModelFacts | None):
        self.recipe, self.profile, self.facts = recipe, profile, facts
        self.decisions: list[Decision] = []
        self.diagnostics: list[Diagnostic] = []
        self.settings: dict[str, Any] = {}  # EngineConfig keyword arguments decided so far
        self.device = profile.device
        self.per_device = "per GPU" if self.device == "cuda" else "on the CPU"

    def decide(self, field: str, value: Any, reason: str) -> Any:
        self.decisions.append(Decision(field=field, value=value, reason=reason))
        return value

    def error(self, code: str, message: str, field: str, hint: str | None = None) -> None:
        self.diagnostics.append(error(code, message, field=field, hint=hint))

    # ----------------------------------------------------------------------------------------------------------
    def run(self) -> Plan:
        r, p = self.recipe, self.profile
        self.decide("device", self.device, f"profile {p.name} ({p.description})")
        self._parallelism()
        if r.backend == "builtin":
            self._builtin_limits()
        runner, convert = self._runner()
        dtype = self._dtype()
        quantization = self._quantization()
        eager = self._eager()
        self._heads()
        self._positions()
        budget = self._memory(dtype, quantization, eager)
        settings = dict(
            model=self.facts.reference if self.facts else r.model,
            served_model_name=r.served_model_name or r.model, revision=r.revision,
            trust_remote_code=r.trust_remote_code, runner=runner, convert=convert, dtype=dtype,
            quantization=quantization, device=self.device,
            tensor_parallel_size=r.parallelism.tensor_parallel_size,
            pipeline_parallel_size=r.parallelism.pipeline_parallel_size,
            distributed_executor_backend=self.executor_backend,
            block_size=r.memory.block_size, kv_cache_dtype=r.memory.kv_cache_dtype, swap_space=r.memory.swap_space,
            cpu_offload_gb=r.memory.cpu_offload_gb, enforce_eager=eager,
            enable_prefix_caching=r.runtime.enable_prefix_caching,
            enable_chunked_prefill=r.runtime.enable_chunked_prefill, seed=r.runtime.seed, host=r.server.host,
            port=r.server.port, api_key_env=r.server.api_key_env, chat_template=r.server.chat_template,
            enable_auto_tool_choice=r.server.enable_auto_tool_choice, tool_call_parser=r.server.tool_call_parser,
            trust_request_chat_template=r.server.trust_request_chat_template,
            embedding_prefixes=r.server.embedding_prefixes, predicted_memory=budget,
            **self.settings,
        )
        engine = self._engine_config(settings)
        env = {**p.env, **r.env}
        if env:
            self.decide("env", env, f"profile {p.name}'s toolchain environment, then the recipe's `env` (recipe wins)")
        return Plan(
            name=r.deployment_name, profile=p.name, gpu_count=p.gpu_count,
            replicas=r.parallelism.data_parallel_size, backend=r.backend, engine=engine, env=env, memory=budget,
            decisions=self.decisions, diagnostics=self.diagnostics, health=r.health.model_dump(),
            rollout=r.rollout.model_dump(),
        )

    def _engine_config(self, settings: dict[str, Any]) -> EngineConfig:
        try:
            return EngineConfig(**settings)
        except EngineConfigError as exc:
            if not has_errors(self.diagnostics):  # a check above should have said why; never crash on it
                self.error("VD005", str(exc), field=exc.field)
            # The plan is rejected by its errors; it still shows the settings as asked, unvalidated.
            config = object.__new__(EngineConfig)
            defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                        for f in dataclasses.fields(EngineConfig) if f.name != "model"}
            config.__dict__.update({**defaults, **settings})
            return config

    # ----------------------------------------------------------------------------------------------- parallelism
    def _parallelism(self) -> None:
        par, p, nodes = self.recipe.parallelism, self.profile, self.recipe.nodes
        ranks = par.tensor_parallel_size * par.pipeline_parallel_size
        self.executor_backend = par.distributed_executor_backend
        if self.device != "cuda":
            return
        hosts = f"the host has {p.gpu_count}" if nodes == 1 else f"{nodes} hosts have {nodes} x {p.gpu_count}"
        if ranks * par.data_parallel_size > p.gpu_count * nodes:
            self.error("VD102", f"{par.data_parallel_size} replica(s) x tensor_parallel_size "
                       f"{par.tensor_parallel_size} x pipeline_parallel_size {par.pipeline_parallel_size} need "
                       f"{ranks * par.data_parallel_size} GPUs; {hosts} {p.name}",
                       "parallelism.tensor_parallel_size",
                       f"set `hardware: {{profile: {p.name}, count: {ranks * par.data_parallel_size}}}` "
                       "if the host has them (or `nodes:` for more hosts), or lower the parallelism")
        if ranks <= p.gpu_count:
            return
        # A replica larger than one host: whole hosts of ranks, joined by Ray.
        if ranks % p.gpu_count:
            self.error("VD102", f"a replica of {ranks} ranks spans hosts of {p.gpu_count} GPUs; it must fill whole "
                       "hosts", "parallelism.tensor_parallel_size",
                       f"use tensor_parallel_size x pipeline_parallel_size = a multiple of {p.gpu_count}")
        elif self.executor_backend == "mp":
            self.error("VD102", f"the mp executor runs a replica's ranks on one host; this replica of {ranks} ranks "
                       f"spans {ranks // p.gpu_count} hosts of {p.gpu_count} GPUs",
                       "parallelism.distributed_executor_backend", "use `distributed_executor_backend: ray`")
        elif self.executor_backend is None:
            self.executor_backend = self.decide(
                "parallelism.distributed_executor_backend", "ray",
                f"a replica's {ranks} ranks span {ranks // p.gpu_count} hosts of {p.gpu_count} GPUs")

    def _builtin_limits(self) -> None:
        """Settings the built-in engine cannot honour: refused here, never ignored at launch (the vllm backend runs
        them)."""
        r = self.recipe
        par, m = r.parallelism, r.memory
        hint = "use `backend: vllm`, or "
        pp, f = par.pipeline_parallel_size, self.facts
        if pp > 1 and f is not None and (f.pooling or r.runner == "pooling"):
            self.error("VD210", "the builtin engine runs pooling models on one pipeline stage",
                       "parallelism.pipeline_parallel_size", hint + "`tensor_parallel_size` over the same GPUs")
        elif pp > 1 and f is not None and f.architecture not in PIPELINE_ARCHITECTURES:
            self.error("VD210", f"the builtin engine cannot split {f.architecture} into pipeline stages (it splits "
                       f"{', '.join(sorted(PIPELINE_ARCHITECTURES))})", "parallelism.pipeline_parallel_size",
                       hint + "`tensor_parallel_size` over the same GPUs")
        elif pp > 1 and f is not None and pp > f.num_layers:
            self.error("VD210", f"pipeline_parallel_size {pp} is more than the model's {f.num_layers} layers",
                       "parallelism.pipeline_parallel_size", f"use at most {f.num_layers} stages")
        if pp > 1 and r.runtime.enforce_eager is False and self.device == "cuda":
            self.error("VD210", "the builtin engine captures no CUDA graphs across pipeline stages",
                       "runtime.enforce_eager", hint + "`enforce_eager: true`")
        if m.cpu_offload_gb > 0:
            self.error("VD210", "the builtin engine keeps every weight on the GPU (no CPU offload)",
                       "memory.cpu_offload_gb", hint + "more GPUs (`tensor_parallel_size`) or a quantized checkpoint")
        if m.kv_cache_dtype != "auto":
            self.error("VD210", f"the builtin engine keeps the KV cache in the model dtype, not {m.kv_cache_dtype}",
                       "memory.kv_cache_dtype", hint + "`kv_cache_dtype: auto`")

    def _heads(self) -> None:
        tp, f = self.recipe.parallelism.tensor_parallel_size, self.facts
        if f is None or tp == 1 or _tp_fits_heads(tp, f):
            return
        valid = [t for t in range(1, f.num_heads + 1) if _tp_fits_heads(t, f) and t <= max(8, tp)]
        self.error("VD206", f"tensor_parallel_size {tp} does not divide the model's {f.num_heads} attention heads "
                   f"({f.num_kv_heads} KV heads)", "parallelism.tensor_parallel_size",
                   f"use one of {', '.join(map(str, valid))}")

    # --------------------------------------------------------------------------------------------- what to run
    def _runner(self) -> tuple[str, str]:
        r, f = self.recipe, self.facts
        pooling_model = bool(f and f.pooling)
        if f and f.needs_remote_code and not r.trust_remote_code:
            self.error("VD209", f"{r.model} runs its own modelling code", "trust_remote_code",
                       "set `trust_remote_code: true` if you trust the model's repository")
        if r.runner == "auto":
            runner = "pooling" if pooling_model else "generate"
            self.decide("runner", runner, "the model is an embedding/encoder model" if pooling_model
                        else "the model has a language-model head")
        else:
            runner = r.runner
        if runner == "generate" and pooling_model:
            self.error("VD205", f"{r.model} is an embedding model ({f.architecture}); it cannot generate text",
                       "runner", "use `runner: pooling` (and `convert: embed`) to serve embeddings")
        if runner == "generate" and r.convert not in ("auto", "none"):
            self.error("VD205", f"convert: {r.convert} applies only to `runner: pooling`", "convert",
                       "use `runner: pooling`, or drop `convert`")
        if r.convert == "auto":
            convert = "embed" if runner == "pooling" else "none"
            self.decide("convert", convert, "pooling runner: embeddings by default" if runner == "pooling"
                        else "generation needs no conversion")
        else:
            convert = r.convert
        if runner == "pooling" and convert == "none" and f and not pooling_model:
            self.error("VD205", f"{r.model} is a text-generation model; pooling it needs a conversion", "convert",
                       "use `convert: embed` (or reward / classify)")
        if r.server.embedding_prefixes and (runner, convert) != ("pooling", "embed"):
            self.error("VD205", "embedding_prefixes apply to embedding deployments (runner pooling, convert embed)",
                       "server.embedding_prefixes", "drop `embedding_prefixes`, or serve embeddings")
        if r.server.embedding_prefixes and r.backend == "vllm":
            self.error("VD211", "vLLM has no embedding_prefixes: its clients write the prefixes into the text",
                       "server.embedding_prefixes", "use `backend: builtin`, or prefix the inputs in the client")
        return runner, convert

    def _dtype(self) -> str:
        r, p = self.recipe, self.profile
        if r.dtype == "auto":
            if self.device == "cpu":
                return self.decide("dtype", "float32", "CPU: float32 is exact and the fastest on most CPUs")
            if r.quantization in _INT4 or (self.facts and self.facts.quantization in _INT4):
                return self.decide("dtype", "float16", "4-bit AWQ/GPTQ kernels compute in float16")
            if p.bf16:
                return self.decide("dtype", "bfloat16", f"{p.name} supports bfloat16 (compute capability "
                                   f"{p.compute_capability})")
            return self.decide("dtype", "float16", f"{p.name} lacks bfloat16 (compute capability "
                               f"{p.compute_capability} < 8.0)")
        dtype = DTYPE_NAMES[r.dtype]
        if dtype == "bfloat16" and self.device == "cuda" and not p.bf16:
            self.error("VD103", f"bfloat16 needs compute capability 8.0 or higher; the {p.name} has "
                       f"{p.compute_capability}", "dtype", "use `dtype: half` (float16)")
        return dtype

    def _quantization(self) -> str | None:
        r, p, f = self.recipe, self.profile, self.facts
        stored = f.quantization if f else None
        if r.quantization is None:
            if stored:
                self.decide("quantization", stored, f"the checkpoint is stored as {stored}")
            quantization = stored
        else:
            quantization = r.quantization
            if f and stored not in QUANT_CHECKPOINTS[quantization]:
                what = f"a {stored} checkpoint" if stored else "not quantized"
                self.error("VD208", f"quantization: {quantization} cannot read {r.model}: it is {what}",
                           "quantization", f"use `quantization: {stored}`" if stored else
                           f"pick a {quantization.split('_')[0].upper()} checkpoint, or `quantization: fp8` on an "
                           "SM89+ GPU to quantize at load")
        if quantization is None:
            return None
        if self.device == "cpu" and quantization != "gguf":
            self.error("VD104", f"quantization {quantization} has no CPU kernels; the builtin engine runs only GGUF "
                       "(dequantized) on the CPU", "quantization", "use an unquantized or GGUF checkpoint")
        elif self.device == "cuda" and p.compute_capability < QUANT_MIN_CAPABILITY[quantization]:
            better = "an AWQ/GPTQ 4-bit checkpoint, or an SM89+ GPU (l4, h100-80gb)" if quantization == "fp8" \
                else "a GPTQ or GGUF checkpoint, or a newer GPU"
            self.error("VD104", f"{quantization} needs compute capability {QUANT_MIN_CAPABILITY[quantization]} or "
                       f"higher; the {p.name} has {p.compute_capability}",
                       "quantization" if r.quantization else "model", f"use {better}")
        return quantization

    def _eager(self) -> bool:
        r, p = self.recipe, self.profile
        if r.runtime.enforce_eager == "auto":
            if self.device == "cpu":
                return self.decide("runtime.enforce_eager", True, "CUDA graphs need a GPU")
            if not p.cuda_graphs:
                return self.decide("runtime.enforce_eager", True, f"CUDA graphs are unsafe on the {p.name} "
                                   "(capture fragments its small memory)")
            if r.backend == "builtin" and r.parallelism.pipeline_parallel_size > 1:
                return self.decide("runtime.enforce_eager", True, "the builtin engine captures no CUDA graphs "
                                   "across pipeline stages")
            return self.decide("runtime.enforce_eager", False, "decode runs as captured CUDA graphs (less CPU "
                               "overhead per step)")
        if r.runtime.enforce_eager is False and self.device == "cuda" and not p.cuda_graphs:
            self.diagnostics.append(warning(
                "VD105", f"CUDA graphs are unsafe on the {p.name}; capture may run out of memory",
                field="runtime.enforce_eager", hint="use `enforce_eager: true`"))
        return r.runtime.enforce_eager

    def _positions(self) -> None:
        r, f = self.recipe, self.facts
        if f and r.memory.max_model_len != "auto" and r.memory.max_model_len > f.max_positions:
            self.error("VD207", f"max_model_len {r.memory.max_model_len} exceeds the model's "
                       f"{f.max_positions} positions (max_position_embeddings)", "memory.max_model_len",
                       f"use `max_model_len: {f.max_positions}` or less")

    # ---------------------------------------------------------------------------------------------------- memory
    def _batched_tokens(self, seqs: int, max_model_len: int) -> int:
        """max_num_batched_tokens: the recipe's, else the profile's chunk (a whole prompt when chunked prefill is off)."""
        fixed = self.recipe.memory.max_num_batched_tokens
        if fixed != "auto":
            return fixed
        chunk = self.profile.max_num_batched_tokens if self.recipe.runtime.enable_chunked_prefill else max_model_len
        return max(chunk, seqs)

    def _check_batching(self, seqs: int, tokens: int, max_model_len: int) -> None:
        if tokens < seqs:
            self.error("VD303", f"max_num_batched_tokens {tokens} is less than max_num_seqs {seqs}",
                       "memory.max_num_batched_tokens", f"use at least {seqs}")
        if not self.recipe.runtime.enable_chunked_prefill and tokens < max_model_len:
            self.error("VD303", f"with chunked prefill off, max_num_batched_tokens ({tokens}) must hold a whole "
                       f"prompt of max_model_len ({max_model_len})", "memory.max_num_batched_tokens",
                       f"use `max_num_batched_tokens: {max_model_len}`, or enable chunked prefill")

    def _decide_batching(self, seqs: int, tokens: int, halved: bool) -> None:
        m, p = self.recipe.memory, self.profile
        if m.max_num_seqs == "auto":
            self.decide("memory.max_num_seqs", seqs, f"profile {p.name}'s default {p.max_num_seqs}, halved until the "
                        "KV cache has room (each batch slot costs sampler memory)" if halved
                        else f"profile {p.name}'s default")
        if m.max_num_batched_tokens == "auto":
            self.decide("memory.max_num_batched_tokens", tokens, f"profile {p.name}'s default for chunked prefill"
                        if self.recipe.runtime.enable_chunked_prefill
                        else "chunked prefill is off: a whole prompt of max_model_len goes in one step")

    def _utilization(self) -> float:
        u = self.recipe.memory.gpu_memory_utilization
        if u == "auto":
            return self.decide("memory.gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION, "vLLM's default")
        return u

    def _memory(self, dtype: str, quantization: str | None, eager: bool) -> MemoryBudget | None:
        r, f = self.recipe, self.facts
        utilization = self._utilization()
        self.settings["gpu_memory_utilization"] = utilization
        if f is None:
            return self._without_facts(utilization)
        m, tp = r.memory, r.parallelism.tensor_parallel_size
        fixed_len = m.max_model_len != "auto"
        target_len = m.max_model_len if fixed_len else f.max_positions
        needed = target_len if fixed_len else m.block_size  # what the KV cache must hold at the least

        def fit(seqs: int, max_model_len: int) -> tuple[int, MemoryBudget]:
            tokens = self._batched_tokens(seqs, max_model_len)
            return tokens, self._layout(dtype, quantization, eager, tp, utilization, seqs, tokens, max_model_len)

        seqs = self.profile.max_num_seqs if m.max_num_seqs == "auto" else m.max_num_seqs
        tokens, layout = fit(seqs, target_len)
        halved = False
        while m.max_num_seqs == "auto" and layout.kv_tokens < needed and seqs > 1:
            seqs, halved = seqs // 2, True
            tokens, layout = fit(seqs, target_len)
        if layout.kv_tokens < m.block_size:
            self._does_not_fit(layout, dtype, quantization, eager, seqs, tokens, target_len, "VD301")
            max_model_len = target_len
        elif fixed_len:
            max_model_len = target_len
            if layout.kv_tokens < max_model_len:
                self._does_not_fit(layout, dtype, quantization, eager, seqs, tokens, max_model_len, "VD302")
        elif layout.kv_tokens < f.max_positions:
            max_model_len = self.decide("memory.max_model_len", layout.kv_tokens,
                                        f"the largest that fits: the KV cache holds {layout.kv_tokens} tokens, less "
                                        f"than the model's {f.max_positions} positions")
            tokens, layout = fit(seqs, max_model_len)  # a whole-prompt batch (chunked prefill off) shrinks with it
        else:
            max_model_len = self.decide("memory.max_model_len", f.max_positions, "the model's positions "
                                        "(max_position_embeddings); the KV cache holds them "
                                        f"{layout.kv_tokens / f.max_positions:.1f} times")
        self._decide_batching(seqs, tokens, halved)
        self._check_batching(seqs, tokens, max_model_len)
        layout = dataclasses.replace(layout, max_model_len=max_model_len)
        fixed_kv = r.memory.kv_cache_memory_bytes
        if fixed_kv != "auto":
            self.settings["kv_cache_memory_bytes"] = fixed_kv
            used = (layout.weights_bytes + layout.activation_bytes + layout.cuda_graph_bytes + layout.overhead_bytes
                    + fixed_kv)
            if self.device == "cuda" and used > self.profile.memory_bytes:
                self.error("VD301", f"kv_cache_memory_bytes ({_gib(fixed_kv)}) with the weights, activations and "
                           f"overhead needs {_gib(used)} per GPU; the {self.profile.name} has "
                           f"{_gib(self.profile.memory_bytes)}", "memory.kv_cache_memory_bytes",
                           f"use at most {max(self.profile.memory_bytes - used + fixed_kv, 0):,}")
        elif self.device == "cpu":
            layout = self._cpu_kv_cache(layout, seqs, max_model_len)
        self.settings.update(max_model_len=max_model_len, max_num_seqs=seqs, max_num_batched_tokens=tokens)
        return layout

    def _cpu_kv_cache(self, layout: MemoryBudget, seqs: int, max_model_len: int) -> MemoryBudget:
        """On the CPU the engine allocates exactly the planned KV cache: what is left of the budget, but no more than
        max_num_seqs full-length sequences can fill (a budget sized from a large machine's RAM would be taken and
        never used)."""
        block = self.recipe.memory.block_size
        fillable = seqs * math.ceil(max_model_len / block) * block * layout.kv_bytes_per_token
        if layout.kv_cache_bytes <= fillable:
            kv, reason = layout.kv_cache_bytes, "CPU: the engine allocates exactly what is left of the budget"
        else:
            kv = fillable
            reason = (f"CPU: what max_num_seqs ({seqs}) sequences of max_model_len ({max_model_len}) can fill; the "
                      f"budget has {_gib(layout.kv_cache_bytes)} left, more than they can use")
        tokens = mem.kv_tokens(kv, layout.kv_bytes_per_token, block)
        kv = max(tokens * layout.kv_bytes_per_token, 1)  # whole blocks: the bytes the engine allocates
        self.settings["kv_cache_memory_bytes"] = self.decide("memory.kv_cache_memory_bytes", kv, f"{reason}, in whole "
                                                             f"blocks of {block} tokens")
        return dataclasses.replace(layout, kv_cache_bytes=kv, kv_tokens=tokens)

    def _layout(self, dtype: str, quantization: str | None, eager: bool, tp: int, utilization: float, seqs: int,
                tokens: int, max_model_len: int) -> MemoryBudget:
        """The memory table for one choice of settings (the compiler also tries others to suggest fixes)."""
        r, f, p = self.recipe, self.facts, self.profile
        pp = r.parallelism.pipeline_parallel_size
        width = mem.DTYPE_BYTES[dtype]
        kv_dtype = dtype if r.memory.kv_cache_dtype == "auto" else r.memory.kv_cache_dtype
        weights = mem.weight_bytes(f, dtype, quantization, dequantize_gguf=r.backend == "builtin", shards=tp)
        weights = mem.largest_stage_weight_bytes(f, weights, pp)  # the plan is the largest stage's
        weights = max(0, weights - int(r.memory.cpu_offload_gb * GiB))
        tied_cpu_head = f.tie_word_embeddings and not f.pooling and pp == 1  # on one stage: embedding and head
        if self.device == "cpu" and r.backend == "builtin" and width == 4 and tied_cpu_head:
            weights += f.vocab_size * f.hidden_size * width  # a tied head is kept twice: plain, and packed for oneDNN
        fixed_kv = r.memory.kv_cache_memory_bytes
        budget = mem.budget_bytes(p.memory_bytes, utilization)
        if self.device == "cpu":  # the ranks share the machine's memory: each plans for its share
            budget //= tp * pp
        return mem.memory_budget(
            budget=budget, weights=weights,
            activations=mem.activation_bytes(f, tokens, seqs, width, tp),
            graphs=mem.cuda_graph_bytes(f, seqs, width, tp, eager), overhead=mem.overhead_bytes(self.device, tp * pp),
            kv_per_token=mem.kv_bytes_per_token(f, mem.DTYPE_BYTES[kv_dtype], tp, pp), block_size=r.memory.block_size,
            max_model_len=max_model_len, kv_cache=None if fixed_kv == "auto" else fixed_kv,
        )

    def _does_not_fit(self, layout: MemoryBudget, dtype: str, quantization: str | None, eager: bool, seqs: int,
                      tokens: int, need_tokens: int, code: str) -> None:
        """An error that says what would fit: a shorter context, more memory, more GPUs, or fewer bits per weight."""
        r, f, p = self.recipe, self.facts, self.profile
        tp = r.parallelism.tensor_parallel_size
        fixed = layout.weights_bytes + layout.activation_bytes + layout.cuda_graph_bytes + layout.overhead_bytes
        need = fixed + need_tokens * layout.kv_bytes_per_token
        fixes = []
        if code == "VD302" and layout.kv_tokens >= r.memory.block_size:
            fixes.append(f"`max_model_len: {min(layout.kv_tokens, f.max_positions)}` (the largest that fits)")
        needed_utilization = math.ceil(need / p.memory_bytes * 100) / 100
        if needed_utilization <= 0.98:
            fixes.append(f"`gpu_memory_utilization: {needed_utilization}`")
        for larger in (2, 4, 8):
            if larger > tp and _tp_fits_heads(larger, f):
                trial = self._layout(dtype, quantization, eager, larger, self.settings["gpu_memory_utilization"], seqs,
                                     tokens, need_tokens)
                if trial.kv_tokens >= need_tokens:
                    fixes.append(f"`tensor_parallel_size: {larger}` ({larger} GPUs)")
                    break
        for fewer in (128, 64, 32, 16, 8):  # the sampler's buffers grow with the batch
            if fewer < seqs and self._layout(dtype, quantization, eager, tp, self.settings["gpu_memory_utilization"],
                                             fewer, tokens, need_tokens).kv_tokens >= need_tokens:
                fixes.append(f"`max_num_seqs: {fewer}`")
                break
        if quantization is None and self.device == "cuda" and p.compute_capability >= 7.5:
            int4 = math.ceil(mem.weight_bytes(f, dtype, "awq", False, tp * r.parallelism.pipeline_parallel_size)
                             / GiB * 10) / 10
            fixes.append(f"a 4-bit AWQ/GPTQ checkpoint ({int4} GiB of weights per GPU)")
        hint = "try " + ", or ".join(fixes) if fixes else "use a larger GPU"
        if code == "VD301":
            message = (f"the model does not fit: weights {_gib(layout.weights_bytes)} + activations "
                       f"{_gib(layout.activation_bytes)} + CUDA graphs {_gib(layout.cuda_graph_bytes)} + overhead "
                       f"{_gib(layout.overhead_bytes)} leave no room for a KV cache in the "
                       f"{_gib(layout.budget_bytes)} budget {self.per_device}")
            self.error(code, message, "model" if tp == 1 else "parallelism.tensor_parallel_size", hint)
        else:
            message = (f"max_model_len {need_tokens} needs {_gib(need_tokens * layout.kv_bytes_per_token)} of KV cache "
                       f"for one sequence; only {_gib(max(layout.kv_cache_bytes, 0))} is left after the weights "
                       f"({_gib(layout.weights_bytes)}) in the {_gib(layout.budget_bytes)} budget {self.per_device}")
            self.error(code, message, "memory.max_model_len", hint)

    def _without_facts(self, utilization: float) -> None:
        r = self.recipe
        max_model_len = r.memory.max_model_len
        if max_model_len == "auto":
            max_model_len = self.decide("memory.max_model_len", DEFAULT_MAX_MODEL_LEN,
                                        "model facts unavailable offline: a conservative default")
        m = r.memory
        seqs = self.profile.max_num_seqs if m.max_num_seqs == "auto" else m.max_num_seqs
        tokens = self._batched_tokens(seqs, max_model_len)
        self._decide_batching(seqs, tokens, halved=False)
        self._check_batching(seqs, tokens, max_model_len)
        self.settings.update(max_model_len=max_model_len, max_num_seqs=seqs, max_num_batched_tokens=tokens)
        if self.device == "cpu" and r.memory.kv_cache_memory_bytes == "auto":
            kv = int(self.profile.memory_bytes * utilization * CPU_KV_SHARE_WITHOUT_FACTS)
            self.settings["kv_cache_memory_bytes"] = self.decide(
                "memory.kv_cache_memory_bytes", kv, "model facts unavailable: half of the CPU budget")
        elif r.memory.kv_cache_memory_bytes != "auto":
            self.settings["kv_cache_memory_bytes"] = r.memory.kv_cache_memory_bytes
        return None


def _tp_fits_heads(tp: int, facts: ModelFacts | None) -> bool:
    """TP must split the attention heads evenly, and the KV heads too (or replicate them evenly, when TP > KV heads)."""
    if facts is None:
        return True
    kv = facts.num_kv_heads
    return facts.num_heads % tp == 0 and (kv % tp == 0 if tp <= kv else tp % kv == 0)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


# ------------------------------------------------------------------------------------------------------ front door


def resolve_hardware(recipe: Recipe) -> tuple[HardwareProfile | None, list[Diagnostic]]:
    """The recipe's profile with `gpu_count` set to the host's; `auto` asks the local driver."""
    if recipe.hardware == "auto":
        found = detect()
        profile = detected_profile(found)
        what = (f"{found.count} x {found.gpu_name} via {found.method}" if found.count
                else f"no GPU; the budget is this machine's {found.memory_gib:.1f} GiB of RAM")
        note = info("VD106", f"hardware: auto found {what}; using profile {profile.name}", field="hardware")
        return profile.model_copy(update={"gpu_count": found.count}), [note]
    field = "hardware" if isinstance(recipe.hardware, str) else "hardware.profile"
    try:
        profile = load_profile(recipe.hardware_profile)
    except ProfileError as exc:
        return None, [error("VD101", str(exc), field=field, hint=exc.hint)]
    count = recipe.gpu_count if recipe.gpu_count is not None else profile.gpu_count
    return profile.model_copy(update={"gpu_count": count}), []


def plan_recipe(recipe: Recipe, source: SourceMap | None = None) -> tuple[Plan | None, list[Diagnostic]]:
    """Hardware, model facts, then compile. Diagnostics are placed in the recipe file when `source` is given.
    The plan is None when the hardware profile or the model cannot be found at all."""
    profile, found = resolve_hardware(recipe)
    facts, about_model = resolve_model(recipe.model, recipe.revision)
    diagnostics = found + about_model
    plan = None
    if profile is not None and not has_errors(about_model):
        plan = compile(recipe, profile, facts)
        diagnostics += plan.diagnostics
    if source is not None:
        diagnostics = [source.place(d) for d in diagnostics]
    if plan is not None:
        plan.diagnostics = diagnostics
    return plan, diagnostics


# vLLM-style keyword arguments -> where they go in a recipe (vdeploy/settings.py); `task`, removed from vLLM, goes to
# the recipe's top level so that validation names it and says what replaced it.
_ARGUMENT_PATHS: dict[str, tuple[str, ...]] = {**settings.argument_paths(), "task": ("task",)}
# EngineConfig fields no recipe holds: passed through to the plan's EngineConfig unchanged.
_ENGINE_ONLY_ARGUMENTS = settings.engine_only_arguments()


def plan_from_args(model: str, **engine_kwargs: Any) -> Plan:
    """A Plan from vLLM-style keyword arguments (`LLM(...)`, `vdeploy serve MODEL --flags`): an implicit recipe that
    goes through the same checks as `vdeploy lint`. `hardware` defaults to auto-detection; `device="cpu"` means
    `hardware="cpu"`. None means "not given". Raises PlanError when the deployment cannot work; warnings stay in
    `plan.diagnostics`."""
    data: dict[str, Any] = {"model": model}
    engine_only = {}
    for key, value in engine_kwargs.items():
        if value is None:
            continue
        if key == "device":
            if value == "cpu":
                data.setdefault("hardware", "cpu")
            continue
        if key in _ENGINE_ONLY_ARGUMENTS:
            engine_only[key] = value
            continue
        if key not in _ARGUMENT_PATHS:
            close = difflib.get_close_matches(key, [*_ARGUMENT_PATHS, *_ENGINE_ONLY_ARGUMENTS], n=1)
            hint = f"did you mean '{close[0]}'?" if close else None
            unknown = error("VD003", f"unknown argument '{key}'", field=key, hint=hint)
            raise PlanError([unknown.model_copy(update={"file": "<arguments>"})])
        *sections, leaf = _ARGUMENT_PATHS[key]
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    document = validate_recipe(data, file="<arguments>")
    if document.recipe is None:
        raise PlanError(document.diagnostics)
    plan, diagnostics = plan_recipe(document.recipe, document.source)
    if plan is None or has_errors(diagnostics):
        raise PlanError(diagnostics)
    for key, value in engine_only.items():
        setattr(plan.engine, key, value)
    return plan


def engine_config_from_args(model: str, **engine_kwargs: Any) -> EngineConfig:
    """The engine's planner (entry point `vdeploy_engine.planner`, which `LLM(...)` calls): plan_from_args' EngineConfig,
    its warnings logged."""
    plan = plan_from_args(model, **engine_kwargs)
    for diagnostic in plan.diagnostics:
        if diagnostic.severity == "warning":
            logger.warning("%s: %s", diagnostic.code, diagnostic.message)
    return plan.engine
