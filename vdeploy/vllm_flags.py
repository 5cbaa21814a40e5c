"""Every flag of `vllm serve` (the vLLM 0.10 / 0.11 generation's `--help`) and what `vdeploy serve` does with it.

A flag is one of:
- supported: a setting of vdeploy/settings.py (the compiler honours it or refuses its value with a diagnostic), or one
  of `vdeploy serve`'s own flags (--api-key, --config);
- ignored: accepted with a warning that says why nothing changes (the built-in engine already behaves that way, or
  the flag only tunes something it does not have);
- refused: `vdeploy serve` stops before loading anything, naming the flag and why (never argparse's "unrecognized
  arguments"). `accepts` lists values that ask for exactly what the built-in engine does: those pass silently.

tests/control/test_vllm_flags.py walks the table: every flag parses, each refused one fails with its reason, each
ignored one warns, and no flag is both a setting and in the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arity = Literal["value", "bool", "switch"]  # switch: --flag / --no-flag


@dataclass(frozen=True)
class VllmFlag:
    flag: str
    status: Literal["refused", "ignored"]
    why: str
    arity: Arity = "value"
    short: str | None = None
    accepts: tuple[str, ...] = ()  # values the built-in engine honours as they are (refused flags only)


# Reasons shared by families of flags.
_LORA = "LoRA adapters are not implemented by the built-in engine"
_MM = "the built-in engine serves text-only models (no multimodal inputs)"
_SPEC = "speculative decoding is not implemented by the built-in engine"
_DP = "replicas are vdeploy's: write parallelism.data_parallel_size in a recipe and run `vdeploy apply` (a router "
_DP += "in front of one engine process per replica)"
_EP = "expert parallelism: the built-in engine has no mixture-of-experts models"
_KV_TRANSFER = "disaggregated prefill / KV transfer is not implemented by the built-in engine"
_TLS = "the built-in server speaks plain HTTP: terminate TLS in a proxy in front of it"
_CORS = "the built-in server sends no CORS headers: put a proxy in front of browsers"
_COMPILE = "the built-in engine does not use torch.compile; its decode steps are CUDA graphs (--enforce-eager)"
_PLUGIN = "the built-in engine loads no plugins or user classes"
_LOG = "the built-in server logs to stderr at VDEPLOY_LOG_LEVEL; this logging option has no counterpart"
_SAME = "the built-in engine already behaves this way"
_MAMBA = "the built-in engine has no Mamba / hybrid models"
_OBS = "tracing is not implemented; metrics are on /metrics under vLLM's names"
_HUB = "hub access: the built-in engine reads local files and the HF cache"
_SCHED = "the built-in scheduler is FCFS with chunked prefill; this scheduling knob has no counterpart"

FLAGS: tuple[VllmFlag, ...] = (
    # Frontend: the HTTP server.
    VllmFlag("--uds", "refused", "the built-in server listens on --host/--port only"),
    VllmFlag("--uvicorn-log-level", "ignored", _LOG),
    VllmFlag("--disable-uvicorn-access-log", "ignored", _LOG, "bool"),
    VllmFlag("--disable-access-log-for-endpoints", "ignored", _LOG),
    VllmFlag("--allow-credentials", "refused", _CORS, "bool"),
    VllmFlag("--allowed-origins", "refused", _CORS),
    VllmFlag("--allowed-methods", "refused", _CORS),
    VllmFlag("--allowed-headers", "refused", _CORS),
    VllmFlag("--lora-modules", "refused", _LORA),
    VllmFlag(
        "--chat-template-content-format",
        "refused",
        "message content reaches the template as a string",
        accepts=("auto", "string"),
    ),
    VllmFlag("--default-chat-template-kwargs", "refused", "send chat_template_kwargs with each request"),
    VllmFlag("--response-role", "refused", "the response role is always assistant", accepts=("assistant",)),
    VllmFlag("--ssl-keyfile", "refused", _TLS),
    VllmFlag("--ssl-certfile", "refused", _TLS),
    VllmFlag("--ssl-ca-certs", "refused", _TLS),
    VllmFlag("--enable-ssl-refresh", "refused", _TLS, "bool"),
    VllmFlag("--ssl-cert-reqs", "refused", _TLS),
    VllmFlag("--ssl-ciphers", "refused", _TLS),
    VllmFlag("--root-path", "refused", "the built-in server is mounted at /; rewrite paths in the proxy"),
    VllmFlag("--middleware", "refused", _PLUGIN),
    VllmFlag("--return-tokens-as-token-ids", "refused", "logprob tokens are returned as text", "bool"),
    VllmFlag(
        "--disable-frontend-multiprocessing", "ignored", "the built-in server and engine share one process", "bool"
    ),
    VllmFlag("--enable-request-id-headers", "refused", "no X-Request-Id header is sent", "bool"),
    VllmFlag("--exclude-tools-when-tool-choice-none", "refused", "tools always reach the chat template", "bool"),
    VllmFlag("--tool-parser-plugin", "refused", _PLUGIN),
    VllmFlag("--tool-server", "refused", "built-in tool servers (the Responses API) are not implemented"),
    VllmFlag("--log-config-file", "ignored", _LOG),
    VllmFlag("--max-log-len", "ignored", "prompts are not logged"),
    VllmFlag("--disable-fastapi-docs", "refused", "the server always serves /docs and /openapi.json", "bool"),
    VllmFlag("--enable-prompt-tokens-details", "refused", "usage has no prompt_tokens_details", "bool"),
    VllmFlag("--enable-server-load-tracking", "refused", "no /load endpoint", "bool"),
    VllmFlag("--enable-force-include-usage", "refused", "usage is streamed when stream_options asks for it", "bool"),
    VllmFlag("--enable-tokenizer-info-endpoint", "refused", "no /tokenizer_info endpoint", "bool"),
    VllmFlag("--enable-log-outputs", "ignored", "outputs are not logged", "bool"),
    VllmFlag("--h11-max-incomplete-event-size", "ignored", "uvicorn's h11 defaults apply"),
    VllmFlag("--h11-max-header-count", "ignored", "uvicorn's h11 defaults apply"),
    VllmFlag("--log-error-stack", "ignored", "internal errors are logged with their stack", "bool"),
    VllmFlag("--headless", "refused", _DP, "bool"),
    VllmFlag("--api-server-count", "refused", "one API server per engine process", short="-asc", accepts=("1",)),
    VllmFlag("--enable-log-requests", "ignored", "requests are not logged one by one; see /metrics", "bool"),
    VllmFlag("--disable-log-requests", "ignored", "requests are not logged one by one", "bool"),
    VllmFlag("--disable-log-stats", "ignored", "statistics are on /metrics and are not logged periodically", "bool"),
    # Model.
    VllmFlag(
        "--tokenizer-mode", "refused", "tokenizers load through transformers' fast tokenizer", accepts=("auto", "hf")
    ),
    VllmFlag("--hf-config-path", "refused", "the model's own config.json (or GGUF metadata) is read"),
    VllmFlag("--allowed-local-media-path", "refused", _MM),
    VllmFlag("--allowed-media-domains", "refused", _MM),
    VllmFlag("--code-revision", "refused", _HUB),
    VllmFlag("--tokenizer-revision", "refused", "the tokenizer comes from --revision"),
    VllmFlag("--rope-scaling", "refused", "RoPE scaling comes from the model's config"),
    VllmFlag("--rope-theta", "refused", "RoPE theta comes from the model's config"),
    VllmFlag("--max-logprobs", "refused", "at most 20 logprobs per token, as OpenAI's API", accepts=("20",)),
    VllmFlag("--logprobs-mode", "refused", "logprobs are raw_logprobs", accepts=("raw_logprobs",)),
    VllmFlag("--disable-sliding-window", "refused", "sliding windows follow the model's config", "bool"),
    VllmFlag("--disable-cascade-attn", "ignored", "the built-in engine has no cascade attention", "bool"),
    VllmFlag("--skip-tokenizer-init", "refused", "the server needs the tokenizer", "bool"),
    VllmFlag("--enable-prompt-embeds", "refused", "prompts are text or token ids", "bool"),
    VllmFlag(
        "--config-format", "refused", "configs are read in HF format (or from GGUF metadata)", accepts=("auto", "hf")
    ),
    VllmFlag("--hf-token", "refused", _HUB),
    VllmFlag("--hf-overrides", "refused", "the model's config is used as it is"),
    VllmFlag("--pooler-config", "refused", "pooling follows --convert and the model's pooling config"),
    VllmFlag("--override-pooler-config", "refused", "pooling follows --convert and the model's pooling config"),
    VllmFlag("--logits-processor-pattern", "refused", _PLUGIN),
    VllmFlag("--logits-processors", "refused", _PLUGIN),
    VllmFlag(
        "--generation-config",
        "refused",
        "sampling defaults are vLLM's own (as --generation-config vllm); "
        "the model's generation_config.json only contributes its EOS ids",
        accepts=("vllm",),
    ),
    VllmFlag("--override-generation-config", "refused", "sampling defaults are vLLM's own"),
    VllmFlag("--enable-sleep-mode", "refused", "sleep mode is not implemented", "bool"),
    VllmFlag(
        "--model-impl", "refused", "the built-in engine runs its own model implementations", accepts=("auto", "vllm")
    ),
    VllmFlag("--override-attention-dtype", "refused", "attention runs in the model dtype"),
    VllmFlag("--io-processor-plugin", "refused", _PLUGIN),
    VllmFlag("--reasoning-parser", "refused", "reasoning content is not split from the answer"),
    # Loading.
    VllmFlag(
        "--load-format",
        "refused",
        "weights load from safetensors or GGUF, whichever the model has",
        accepts=("auto", "safetensors", "gguf"),
    ),
    VllmFlag("--safetensors-load-strategy", "ignored", "safetensors files are memory-mapped"),
    VllmFlag("--model-loader-extra-config", "refused", "the loader takes no extra configuration"),
    VllmFlag("--ignore-patterns", "refused", _HUB),
    VllmFlag("--use-tqdm-on-load", "ignored", "loading shows no progress bar", "switch"),
    VllmFlag("--pt-load-map-location", "refused", "weights load straight to the engine's device"),
    # Structured outputs.
    VllmFlag(
        "--structured-outputs-config",
        "refused",
        "structured outputs use xgrammar with compact JSON whitespace; the configuration is fixed",
    ),
    VllmFlag("--guided-decoding-backend", "refused", "structured outputs use xgrammar", accepts=("auto", "xgrammar")),
    VllmFlag("--guided-decoding-disable-fallback", "ignored", "there is no fallback backend to disable", "bool"),
    VllmFlag(
        "--guided-decoding-disable-any-whitespace",
        "ignored",
        "JSON is always generated without free whitespace",
        "bool",
    ),
    VllmFlag(
        "--guided-decoding-disable-additional-properties", "refused", "JSON schemas are enforced as given", "bool"
    ),
    # Parallelism.
    VllmFlag(
        "--decode-context-parallel-size",
        "refused",
        "context parallelism is not implemented",
        short="-dcp",
        accepts=("1",),
    ),
    VllmFlag("--data-parallel-size", "refused", _DP, short="-dp", accepts=("1",)),
    VllmFlag("--data-parallel-rank", "refused", _DP, short="-dpn"),
    VllmFlag("--data-parallel-start-rank", "refused", _DP, short="-dpr"),
    VllmFlag("--data-parallel-size-local", "refused", _DP, short="-dpl"),
    VllmFlag("--data-parallel-address", "refused", _DP, short="-dpa"),
    VllmFlag("--data-parallel-rpc-port", "refused", _DP, short="-dpp"),
    VllmFlag("--data-parallel-backend", "refused", _DP, short="-dpb"),
    VllmFlag("--data-parallel-hybrid-lb", "refused", _DP, "bool"),
    VllmFlag("--enable-expert-parallel", "refused", _EP, "bool"),
    VllmFlag("--enable-eplb", "refused", _EP, "bool"),
    VllmFlag("--eplb-config", "refused", _EP),
    VllmFlag("--expert-placement-strategy", "refused", _EP),
    VllmFlag("--num-redundant-experts", "refused", _EP),
    VllmFlag("--eplb-window-size", "refused", _EP),
    VllmFlag("--eplb-step-interval", "refused", _EP),
    VllmFlag("--eplb-log-balancedness", "refused", _EP, "bool"),
    VllmFlag(
        "--max-parallel-loading-workers",
        "ignored",
        "each rank loads its own shard",
    ),
    VllmFlag("--ray-workers-use-nsight", "refused", "profiling Ray workers is not implemented", "bool"),
    VllmFlag("--disable-custom-all-reduce", "ignored", "the built-in engine always uses NCCL's all-reduce", "bool"),
    VllmFlag("--worker-cls", "refused", _PLUGIN),
    VllmFlag("--worker-extension-cls", "refused", _PLUGIN),
    VllmFlag("--enable-multimodal-encoder-data-parallel", "refused", _MM, "bool"),
    # KV cache.
    VllmFlag("--num-gpu-blocks-override", "refused", "size the cache with --kv-cache-memory-bytes"),
    VllmFlag(
        "--prefix-caching-hash-algo",
        "refused",
        "prefix blocks are keyed by Python's hash of the chained token ids",
        accepts=("builtin",),
    ),
    VllmFlag("--calculate-kv-scales", "refused", "fp8 KV caches are not implemented", "bool"),
    VllmFlag("--kv-sharing-fast-prefill", "refused", "KV sharing across layers is not implemented", "bool"),
    VllmFlag("--mamba-cache-dtype", "refused", _MAMBA),
    VllmFlag("--mamba-ssm-cache-dtype", "refused", _MAMBA),
    # Multimodal.
    VllmFlag("--limit-mm-per-prompt", "refused", _MM),
    VllmFlag("--media-io-kwargs", "refused", _MM),
    VllmFlag("--mm-processor-kwargs", "refused", _MM),
    VllmFlag("--mm-processor-cache-gb", "refused", _MM),
    VllmFlag("--disable-mm-preprocessor-cache", "refused", _MM, "bool"),
    VllmFlag("--mm-processor-cache-type", "refused", _MM),
    VllmFlag("--mm-shm-cache-max-object-size-mb", "refused", _MM),
    VllmFlag("--mm-encoder-tp-mode", "refused", _MM),
    VllmFlag("--interleave-mm-strings", "refused", _MM, "bool"),
    VllmFlag("--skip-mm-profiling", "refused", _MM, "bool"),
    VllmFlag("--video-pruning-rate", "refused", _MM),
    # LoRA.
    VllmFlag("--enable-lora", "refused", _LORA, "bool"),
    VllmFlag("--enable-lora-bias", "refused", _LORA, "bool"),
    VllmFlag("--max-loras", "refused", _LORA),
    VllmFlag("--max-lora-rank", "refused", _LORA),
    VllmFlag("--lora-extra-vocab-size", "refused", _LORA),
    VllmFlag("--lora-dtype", "refused", _LORA),
    VllmFlag("--max-cpu-loras", "refused", _LORA),
    VllmFlag("--fully-sharded-loras", "refused", _LORA, "bool"),
    VllmFlag("--default-mm-loras", "refused", _LORA),
    # Observability.
    VllmFlag("--show-hidden-metrics-for-version", "ignored", "no metric is hidden"),
    VllmFlag("--otlp-traces-endpoint", "refused", _OBS),
    VllmFlag("--collect-detailed-traces", "refused", _OBS),
    # Scheduler.
    VllmFlag("--max-num-partial-prefills", "refused", _SCHED, accepts=("1",)),
    VllmFlag("--max-long-partial-prefills", "refused", _SCHED, accepts=("1",)),
    VllmFlag("--long-prefill-token-threshold", "refused", _SCHED, accepts=("0",)),
    VllmFlag(
        "--cuda-graph-sizes",
        "refused",
        "decode graphs are captured for 1, 2, 4 and every multiple of 8 up to max_num_seqs (at most 512)",
    ),
    VllmFlag("--num-lookahead-slots", "refused", _SPEC, accepts=("0",)),
    VllmFlag("--scheduler-delay-factor", "refused", _SCHED, accepts=("0", "0.0")),
    VllmFlag("--preemption-mode", "refused", "preemption swaps when --swap-space allows, else recomputes"),
    VllmFlag("--scheduling-policy", "refused", _SCHED, accepts=("fcfs",)),
    VllmFlag("--disable-chunked-mm-input", "ignored", _MM, "bool"),
    VllmFlag("--scheduler-cls", "refused", _PLUGIN),
    VllmFlag(
        "--disable-hybrid-kv-cache-manager", "ignored", "the built-in KV cache manager has one block kind", "bool"
    ),
    VllmFlag("--async-scheduling", "ignored", "greedy decode steps are already launched one step ahead", "bool"),
    # Whole-engine configurations.
    VllmFlag("--speculative-config", "refused", _SPEC),
    VllmFlag("--kv-transfer-config", "refused", _KV_TRANSFER),
    VllmFlag("--kv-events-config", "refused", "KV cache events are not published"),
    VllmFlag("--compilation-config", "refused", _COMPILE, short="-O"),
    VllmFlag("--additional-config", "refused", _PLUGIN),
)

BY_FLAG: dict[str, VllmFlag] = {f.flag: f for f in FLAGS}
