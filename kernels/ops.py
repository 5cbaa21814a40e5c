"""Kernels used by the engine. Each module holds a pure-torch reference `<name>_ref` (the CPU path and the test
oracle) and its Triton version `<name>_triton`; the public function picks Triton for CUDA tensors and the reference
otherwise. The Triton versions also run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported),
which is how the tests exercise them without a GPU. They read strided inputs (q/k/v as views of a fused qkv
projection) as long as the last dim is contiguous, allocate their outputs, and never synchronise with the host, so
they can be captured in CUDA graphs. paged_decode_attention_triton takes a keyword-only `num_splits` (default: chosen
from shapes) to force how many parts each context is cut into.

Fused kernels for the small-batch decoder layer (a decode step: 4 launches a layer and the attention's, instead of 11):
- fused_linear(x, weight, bias, *, norm_weight, eps, gate_up, residual): x' W^T + bias + residual, where x' is x,
  rms_norm(x) * norm_weight, or silu_and_mul(x). Its Triton path is a GEMV for decode batches of at most 16 rows;
  larger CUDA batches (prefills) take the reference, i.e. the separate kernels and cuBLAS. fused_linear_triton
  (ValueError past 16 rows) takes keyword-only block_n/block_k/num_warps to force tiles; kernels/linear.py's
  _linear_config is the one place that picks them.
- rotary_and_cache(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox): apply_rotary
  and write_kv_cache in one launch; returns the rotated q, the rotated k exists only in the cache.
- rotary_decode_attention(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, block_tables,
  seq_lens, scale, sliding_window, is_neox): rotary_and_cache and paged_decode_attention for a decode step, with no
  rotary launch: the decode kernel rotates q and the newest k in registers and stores the newest k/v as it attends.

Mixture of experts: fused_moe(x, w13, w2, topk_weights, topk_ids): x [T, H] through each token's top-k experts
(w13 [E, 2I, H] gate/up rows, w2 [E, H, I]), weighted and summed -> [T, H]; Triton sorts the tokens by expert and runs
one grouped GEMM per projection.

On Hopper the decode kernels launch with programmatic dependent launch (kernels/launch.py): each starts while the one
before drains, and reads what no earlier kernel of the step writes before it waits.

Shapes (T = tokens in a flat batch, B = sequences, H/Hkv = query/KV heads, D = head_dim):
- KV cache per layer: key_cache and value_cache, each [num_blocks, block_size, Hkv, D].
- slot_mapping [T] int64: block_id * block_size + offset, or -1 for a token whose KV is not stored.
- block_tables [B, max_blocks] int32 (unused entries may hold any valid block id); seq_lens [B] int32: the context
  length of each sequence *including* this step's tokens, all of which are already written to the cache.
"""

from vdeploy_kernels.activation import silu_and_mul
from vdeploy_kernels.attention import (
    paged_decode_attention,
    paged_prefill_attention,
    rotary_decode_attention,
    varlen_attention,
)
from vdeploy_kernels.kv_cache import write_kv_cache
from vdeploy_kernels.linear import fused_linear
from vdeploy_kernels.moe import fused_moe
from vdeploy_kernels.rms_norm import rms_norm
from vdeploy_kernels.rotary import apply_rotary, rotary_and_cache

__all__ = [
    "apply_rotary",
    "fused_linear",
    "fused_moe",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_and_cache",
    "rotary_decode_attention",
    "silu_and_mul",
    "varlen_attention",
    "write_kv_cache",
]
