"""Pipeline parallelism on the CPU (gloo): layers split over 2 stages (and 2 stages of 2 tensor-parallel ranks)
generate the same greedy tokens as the whole model in one process; each stage holds what the plan says it holds."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_tensor_parallel import PROMPTS, greedy_tokens
from tests.fixtures.tiny_models import save_tiny_model
from vdeploy_engine import SamplingParams
from vdeploy_engine.config import EngineConfig, EngineConfigError
from vdeploy_engine.distributed.parallel import SINGLE, Stage
from vdeploy_engine.layers.attention import Attention, AttentionMetadata
from vdeploy_engine.layers.linear import process_weights_after_loading
from vdeploy_engine.loader import load_hf_config, load_model
from vdeploy_engine.worker.memory_use import module_tensor_bytes
from vdeploy_engine.worker.model_runner import micro_batches


@pytest.fixture(scope="module")
def qwen2_three_layers(tmp_path_factory) -> str:
    """Qwen2 (q/k/v biases) with untied embeddings and 3 layers: 2 stages split them 2 + 1."""
    return str(save_tiny_model(tmp_path_factory.mktemp("qwen2-pp"), "qwen2", num_hidden_layers=3,
                               tie_word_embeddings=False))


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_qwen2_pipeline_matches_one_process(qwen2_three_layers, tp, pp):
    want = greedy_tokens(qwen2_three_layers, PROMPTS)
    assert greedy_tokens(qwen2_three_layers, PROMPTS, tensor_parallel_size=tp, pipeline_parallel_size=pp) == want


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_opt_pipeline_matches_one_process(tiny_opt_dir, tp, pp):
    """OPT's head is tied to the embedding: the last stage keeps a copy of the first stage's table."""
    want = greedy_tokens(str(tiny_opt_dir), PROMPTS)
    assert greedy_tokens(str(tiny_opt_dir), PROMPTS, tensor_parallel_size=tp, pipeline_parallel_size=pp) == want


def test_smollm2_gguf_pp2_matches_one_process(smollm2_gguf_path):
    """The real model: 30 layers, 15 a stage, a tied head; four prompts make two micro-batches a stage."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    path, args = str(smollm2_gguf_path), dict(max_model_len=64, kv_cache_memory_bytes=8 << 20)
    assert greedy_tokens(path, prompts, params, pipeline_parallel_size=2, **args) == greedy_tokens(path, prompts,
                                                                                                    params, **args)


@pytest.mark.parametrize(("model", "pp"), [("smollm2", 2), ("opt", 2), ("llama-5-layers", 3)])
def test_each_stage_holds_what_the_plan_says(smollm2_gguf_path, tiny_opt_dir, tmp_path, model, pp):
    """The plan's weights and KV cache per rank are the largest stage's: measured on each stage's model as the engine
    builds it (no process group needed to build one), never above the plan and within 3 % of it. SmolLM2: a tied
    head copied to the last stage and a rotary table on each; OPT: a learned position table on the first; 5 layers
    in 3 stages: 2 + 2 + 1."""
    from vdeploy.compiler import plan_from_args

    path = {"smollm2": smollm2_gguf_path, "opt": tiny_opt_dir}.get(model) or save_tiny_model(
        tmp_path, "llama", num_hidden_layers=5)
    plan = plan_from_args(str(path), pipeline_parallel_size=pp, max_model_len=64, dtype="float32")
    config = plan.engine
    hf_config = load_hf_config(config)
    weights, kv_per_token = [], []
    for index in range(pp):
        model = load_model(config, hf_config, SINGLE, Stage(index, pp))
        process_weights_after_loading(model)
        weights.append(module_tensor_bytes(model))
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        kv_per_token.append(sum(2 * m.num_kv_heads * m.head_dim * 4 for m in layers))
        del model
    assert 0.97 * plan.memory.weights_bytes <= max(weights) <= plan.memory.weights_bytes, (weights, plan.memory)
    assert max(kv_per_token) == plan.memory.kv_bytes_per_token


def test_micro_batches_split_a_mixed_step_by_tokens():
    """Three sequences of 6, 1 and 1 new tokens, the last token of each sampled: two groups, the prompt alone."""
    meta = AttentionMetadata(
        slot_mapping=torch.arange(8), seq_lens=torch.tensor([6, 9, 4], dtype=torch.int32),
        block_tables=torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 6, 7, 8], dtype=torch.int32),
    )
    parts = micro_batches(meta, 8, [5, 6, 7], 2)
    assert [(p[0].start, p[0].stop) for p in parts] == [(0, 6), (6, 8)]
    assert [p[2] for p in parts] == [[5], [0, 1]]
    second = parts[1][1]
    assert second.cu_seqlens_q.tolist() == [0, 1, 2] and second.seq_lens.tolist() == [9, 4]
    assert second.block_tables.tolist() == [[2, 3], [4, 5]] and second.slot_mapping.tolist() == [6, 7]


def test_micro_batches_of_a_decode_step_keep_it_a_decode_step():
    meta = AttentionMetadata(torch.arange(5), torch.full((5,), 3, dtype=torch.int32),
                             torch.zeros(5, 1, dtype=torch.int32), None)
    parts = micro_batches(meta, 5, list(range(5)), 4)
    assert [p[0].stop - p[0].start for p in parts] == [2, 1, 1, 1]
    assert all(p[1].cu_seqlens_q is None for p in parts)
    assert [p[2] for p in parts] == [[0, 1], [0], [0], [0]]


def test_the_pooling_runner_refuses_pipeline_stages(minilm_dir):
    with pytest.raises(EngineConfigError, match="pipeline_parallel_size"):
        EngineConfig(model=str(minilm_dir), runner="pooling", pipeline_parallel_size=2)
