"""The memory model (DESIGN.md, "The compiler and the memory model"), per GPU, in bytes. Pure arithmetic.

    kv_cache = budget - weights - activations - cuda_graphs - overhead

Each term is one function below with the source of its numbers. The plan must never under-predict what the engine
really uses; where a number is an estimate it errs high.
"""

from __future__ import annotations

import math

from vdeploy.modelinfo import ModelFacts
from vdeploy_engine.config import MemoryBudget, graph_batch_sizes, stage_layers

MiB = 1 << 20
GiB = 1 << 30

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}

# CUDA context, kernel images and cuBLAS/cuDNN workspaces: nvidia-smi shows 450-520 MiB in use after the first
# cuBLAS GEMM with torch 2.x on A100/H100 before any tensor is allocated. Rounded up.
CUDA_CONTEXT_BYTES = 512 * MiB
# NCCL communicators for TP/PP: NCCL_BUFFSIZE (4 MiB) per channel and direction; with up to 32 channels on NVLink
# that is 256 MiB, plus vLLM-style custom all-reduce buffers (~ 64 MiB). Rounded up.
NCCL_BYTES = 320 * MiB
# CUDA graphs: each captured batch size keeps its own kernel parameters and graph nodes on the device; ~1.5 MiB
# per graph for a 28-layer decoder as vLLM's capture log reports. Its private memory pool is sized separately.
PER_GRAPH_BYTES = 2 * MiB

# A CPU replica's process beyond its tensors: the interpreter, torch and its libraries, transformers, the HTTP server,
# the tokenizer. Measured at start-up as the resident set less weights and KV cache (engine/worker/memory_use.py; torch
# 2.13 CPU, 2 cores): 417 MiB for a tiny model and 439 MiB for SmolLM2-135M on the development machine, 539 MiB for the
# tiny model on the CI machine (the same packages: the machine's CPU and kernel decide how much of the libraries is
# resident). One figure has to hold on both, so it covers the larger, with room for the SmolLM2 tokenizer's 22 MiB.
CPU_PROCESS_BYTES = 600 * MiB

# AWQ/GPTQ 4-bit: 4 bits per weight plus an fp16 scale and a 4-bit zero point per group of 128 weights.
INT4_BYTES_PER_WEIGHT = (4 + (16 + 4) / 128) / 8


def budget_bytes(memory_bytes: int, utilization: float) -> int:
    """What the deployment may use on one GPU: vLLM's rule, total memory times gpu_memory_utilization."""
    return int(memory_bytes * utilization)


def weight_bytes(facts: ModelFacts, dtype: str, quantization: str | None, dequantize_gguf: bool, shards: int) -> int:
    """Weights on one GPU. Plain weights: parameters x bytes of the chosen dtype (the checkpoint's own dtype does not
    matter, the loader casts). Quantized: the stored bytes when known (exact for local files), else the format's size
    per weight. `dequantize_gguf`: an engine that expands GGUF blocks to `dtype` at load. Sharded over `shards` ranks;
    the norms are replicated but are < 0.1% of any model, which the rounding up below covers."""
    unquantized = facts.param_count * DTYPE_BYTES[dtype]
    if quantization is None or (quantization == "gguf" and dequantize_gguf):
        total = unquantized
    elif facts.checkpoint_bytes is not None and quantization == facts.quantization:
        total = facts.checkpoint_bytes
    elif quantization in ("awq", "awq_marlin", "gptq", "gptq_marlin"):
        total = _quantized(facts, INT4_BYTES_PER_WEIGHT)
    else:  # online fp8 (linear layers in 1 byte), or bitsandbytes / GGUF of unknown size: 1 byte is an upper bound
        total = _quantized(facts, 1.0)
    return math.ceil(total / shards)


def largest_stage_weight_bytes(facts: ModelFacts, weights: int, pp: int) -> int:
    """What the largest pipeline stage holds of `weights` (the whole model's, on one tensor-parallel rank): its layers
    (config.stage_layers, as the engine splits them); on the first stage the token embedding (and OPT's learned
    position table); on the last the final norm and the LM head (a tied head too: a later stage than the embedding's
    keeps a copy). Rotary models keep a float32 cos/sin table (positions x head_dim) on every stage, which the whole
    model's count leaves to rounding. `weights` as it is without pipeline parallelism."""
    if pp == 1:
        return weights
    table = facts.vocab_size * facts.hidden_size
    learned_positions = (facts.max_positions + 2) * facts.hidden_size if facts.model_type == "opt" else 0
    per_layer = (facts.param_count - facts.embedding_params - learned_positions) / facts.num_layers
    first, last = table + learned_positions, table + 2 * facts.hidden_size  # a norm's weight and bias
    pp = min(pp, facts.num_layers)  # more stages than layers is refused (VD210); plan as if one layer each
    largest = max(len(layers) * per_layer + first * (i == 0) + last * (i == pp - 1)
                  for i, layers in enumerate(stage_layers(facts.num_layers, pp)))
    rotary = 0 if learned_positions else facts.max_positions * facts.head_dim * 4
    return math.ceil(weights * largest / facts.param_count) + rotary


def _quantized(facts: ModelFacts, bytes_per_weight: float) -> int:
    linear = facts.param_count - facts.embedding_params
    return int(linear * bytes_per_weight + facts.embedding_params * 2)


def kv_bytes_per_token(facts: ModelFacts, kv_dtype_bytes: int, tp: int, pp: int) -> int:
    """2 (K and V) x layers on this rank x KV heads on this rank x head_dim x bytes. With more TP ranks than KV
    heads, each rank keeps a replica of one head (vLLM's rule), hence max(1, ...): an MQA model (one KV head) keeps
    it on every rank. Sliding-window layers count in full: the built-in engine's paged cache keeps every token of
    every layer (it has no per-layer-type block pools that drop blocks behind the window)."""
    layers = math.ceil(facts.num_layers / pp)
    kv_heads = max(1, facts.num_kv_heads // tp)
    return 2 * layers * kv_heads * facts.head_dim * kv_dtype_bytes


def forward_bytes(facts: ModelFacts, num_tokens: int, dtype_bytes: int, tp: int) -> int:
    """Peak transient memory of one forward pass over `num_tokens` tokens, before the LM head.
    Layers run one after another, so one layer's working set counts: at the MLP the residual stream and the normed
    input (2 x hidden) are live with gate_up (2 x intermediate / TP) and the activated half (intermediate / TP), plus
    the norm's float32 upcast (hidden x 4 bytes); the weights' bytes count every expert (weight_bytes). The attention block needs less (q, k, v and output: 4 x hidden)."""
    hidden = facts.hidden_size
    # A mixture of experts sends each token through `experts_per_token` experts: gate/up and the activated half for
    # each of its rows (the CPU reference's per-expert peak; the fused GPU kernel needs less).
    width = max(facts.intermediate_size, facts.experts_per_token * facts.expert_intermediate_size)
    mlp = num_tokens * ((2 * hidden + 3 * width // tp) * dtype_bytes + hidden * 4)
    attention = num_tokens * 4 * hidden * dtype_bytes
    return max(mlp, attention)


def logits_bytes(facts: ModelFacts, rows: int, dtype_bytes: int) -> int:
    """The LM head's output for the rows being sampled (one per sequence); none for a pooling model."""
    return 0 if facts.pooling else rows * facts.vocab_size * dtype_bytes


# engine/worker/sampler.py's top-k/top-p path keeps up to nine vocab-wide buffers per row: the float32 copy, the
# temperature-scaled logits, sorted values and their int64 order, the masked copy, probabilities, their cumulative
# sum and the mass before each token (4 + 4 + 4 + 8 + 4 + 4 + 4 + 4 bytes), and the boolean drop mask (1), rounded up.
SAMPLER_BYTES_PER_LOGIT = 40


def sampler_bytes(facts: ModelFacts, rows: int) -> int:
    """The sampler's float32/int64 buffers over the logits of `rows` sequences; none for a pooling model."""
    return 0 if facts.pooling else rows * facts.vocab_size * SAMPLER_BYTES_PER_LOGIT


def activation_bytes(facts: ModelFacts, num_tokens: int, num_seqs: int, dtype_bytes: int, tp: int) -> int:
    """The largest step the scheduler can build (`num_tokens` over `num_seqs` sequences): its forward pass, then the
    logits of one row per sequence and the sampler's buffers over them."""
    rows = min(num_seqs, num_tokens)
    return forward_bytes(facts, num_tokens, dtype_bytes, tp) + logits_bytes(facts, rows, dtype_bytes) + sampler_bytes(
        facts, rows)


def cuda_graph_bytes(facts: ModelFacts, max_num_seqs: int, dtype_bytes: int, tp: int, enforce_eager: bool) -> int:
    """0 when eager. Otherwise the graphs' shared memory pool, sized by the largest captured decode batch's forward
    pass and logits (sampling runs outside the graph), plus per-graph bookkeeping. A documented estimate: the engine
    measures the real figure."""
    if enforce_eager:
        return 0
    sizes = graph_batch_sizes(max_num_seqs)
    pool = forward_bytes(facts, sizes[-1], dtype_bytes, tp) + logits_bytes(facts, sizes[-1], dtype_bytes)
    return pool + PER_GRAPH_BYTES * len(sizes)


def overhead_bytes(device: str, ranks: int) -> int:
    """Memory the engine does not allocate itself: the CUDA context, and NCCL buffers when there are several ranks;
    on the CPU the whole process beyond its tensors (the budget is RAM, which the process counts against)."""
    if device == "cpu":
        return CPU_PROCESS_BYTES
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if ranks > 1 else 0)


def kv_tokens(kv_cache_bytes: int, per_token: int, block_size: int) -> int:
    """Tokens the KV cache holds: whole blocks only."""
    return max(0, kv_cache_bytes // (per_token * block_size)) * block_size


def memory_budget(*, budget: int, weights: int, activations: int, graphs: int, overhead: int, kv_per_token: int,
                  block_size: int, max_model_len: int, kv_cache: int | None = None) -> MemoryBudget:
    """The table `vdeploy plan` shows. `kv_cache` fixes the cache size (kv_cache_memory_bytes); else it is what is left."""
    kv_cache = budget - weights - activations - graphs - overhead if kv_cache is None else kv_cache
    tokens = kv_tokens(kv_cache, kv_per_token, block_size)
    return MemoryBudget(
        budget_bytes=budget, weights_bytes=weights, activation_bytes=activations, cuda_graph_bytes=graphs,
        overhead_bytes=overhead, kv_cache_bytes=kv_cache, kv_bytes_per_token=kv_per_token, kv_tokens=tokens,
        max_model_len=max_model_len,
    )
