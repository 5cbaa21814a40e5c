"""The memory model for the newer architectures, worked by hand from each catalogue config (per GPU, eager, bf16):
Gemma 3 (MQA, sliding-window layers, head_dim 256), Qwen3-MoE and Mixtral (every expert's weights on every rank)."""

from __future__ import annotations

from vdeploy.compiler import plan_recipe
from vdeploy.modelinfo import resolve_model
from vdeploy.plan import Plan
from vdeploy.recipe import Recipe

GiB = 1 << 30
MiB = 1 << 20
CONTEXT, NCCL = 512 * MiB, 320 * MiB


def plan(model: str, hardware: str, tp: int = 1) -> Plan:
    recipe = Recipe.model_validate(dict(
        model=model, hardware={"profile": hardware, "count": tp}, parallelism={"tensor_parallel_size": tp},
        memory={"max_model_len": 4096, "max_num_seqs": 8, "max_num_batched_tokens": 1024},
        runtime={"enforce_eager": True},
    ))
    result, diagnostics = plan_recipe(recipe)
    assert result is not None, diagnostics
    return result


def test_gemma3_270m_on_l4():
    m = plan("google/gemma-3-270m-it", "l4").memory
    # embeddings 262144 x 640 (tied) + 18 layers x (q 640x1024, k and v 640x256, o 1024x640, MLP 3 x 640x2048,
    # four norms of 640, q/k norms of 256) + the final norm of 640
    params = 262144 * 640 + 18 * (640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048 + 4 * 640 + 2 * 256) + 640
    assert resolve_model("google/gemma-3-270m-it")[0].param_count == params == 268_098_176
    assert m.weights_bytes == params * 2
    forward = 1024 * ((2 * 640 + 3 * 2048) * 2 + 640 * 4)  # the MLP's working set, the norm's fp32 copy
    assert m.activation_bytes == forward + 8 * 262144 * 2 + 8 * 262144 * 40  # logits and sampler over 8 rows
    # MQA: one KV head of 256 in all 18 layers, the five sliding layers of every six included (the engine keeps
    # every token of every layer)
    assert m.kv_bytes_per_token == 2 * 18 * 1 * 256 * 2 == 18_432
    assert m.kv_cache_bytes == int(int(21.96 * GiB) * 0.9) - m.weights_bytes - m.activation_bytes - CONTEXT


def test_gemma3_mqa_head_is_replicated_on_every_rank():
    assert plan("google/gemma-3-1b-it", "l4", tp=2).memory.kv_bytes_per_token == 2 * 26 * 1 * 256 * 2


def test_qwen3_30b_a3b_tp2_counts_every_expert():
    m = plan("Qwen/Qwen3-30B-A3B", "h100-80gb", tp=2).memory
    attention = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128  # q, k, v, o, q/k norms
    experts = 2048 * 128 + 128 * 3 * 2048 * 768  # router + 128 experts' gate/up/down
    params = 2 * 151936 * 2048 + 48 * (attention + experts + 2 * 2048) + 2048
    assert params == 30_532_122_624
    assert m.weights_bytes == params * 2 // 2
    # 8 experts a token of width 768 = 6144, the dense width: either way 3 x 6144 over 2 ranks
    forward = 1024 * ((2 * 2048 + 3 * 6144 // 2) * 2 + 2048 * 4)
    assert m.activation_bytes == forward + 8 * 151936 * 2 + 8 * 151936 * 40
    assert m.kv_bytes_per_token == 2 * 48 * (4 // 2) * 128 * 2 == 49_152
    budget = int(int(79.19 * GiB) * 0.9)
    assert m.kv_cache_bytes == budget - m.weights_bytes - m.activation_bytes - CONTEXT - NCCL


def test_mixtral_8x7b_tp4():
    m = plan("mistralai/Mixtral-8x7B-Instruct-v0.1", "h100-80gb", tp=4).memory
    attention = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096
    experts = 4096 * 8 + 8 * 3 * 4096 * 14336
    params = 2 * 32000 * 4096 + 32 * (attention + experts + 2 * 4096) + 4096
    assert params == 46_702_792_704
    assert m.weights_bytes == params * 2 // 4
    # two experts a token of width 14336 each: 28672 wide, over 4 ranks
    forward = 1024 * ((2 * 4096 + 3 * 28672 // 4) * 2 + 4096 * 4)
    assert m.activation_bytes == forward + 8 * 32000 * 2 + 8 * 32000 * 40
    assert m.kv_bytes_per_token == 2 * 32 * (8 // 4) * 128 * 2 == 32_768
