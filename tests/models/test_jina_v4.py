"""jina-embeddings-v4's text embeddings: the Qwen2.5-VL language model (multimodal rotary over text positions), mean
pooling and L2 normalisation, against transformers' mean-pooled last hidden states on a random-weight fixture."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.pooling import PoolingEngine


@pytest.fixture(scope="module")
def engine(tiny_qwen2_5_vl_dir):
    config = EngineConfig(model=str(tiny_qwen2_5_vl_dir), runner="pooling", convert="embed", dtype="float32")
    engine = PoolingEngine(config)
    yield engine
    engine.shutdown()


def test_embeddings_equal_transformers_mean_pooled_hidden_states(engine, tiny_qwen2_5_vl_dir, prompts):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert (engine.spec.method, engine.spec.normalize) == ("mean", True)

    async def embed_all():
        return await asyncio.gather(*(engine.embed(p) for p in prompts))

    ours = torch.tensor(asyncio.run(embed_all()))
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [reference.model(input_ids=torch.tensor([p])).last_hidden_state[0] for p in prompts]
    want = torch.nn.functional.normalize(torch.stack([h.mean(dim=0) for h in hidden]), dim=-1)
    cosine = torch.nn.functional.cosine_similarity(ours, want, dim=-1)
    assert (cosine >= 0.999).all(), cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(prompts)))
    # Different texts, different vectors: the pooling did not collapse.
    assert torch.nn.functional.cosine_similarity(ours[0], ours[1], dim=0) < 0.99


def test_vision_tower_is_skipped_and_the_text_model_loaded(engine):
    names = {name for name, _ in engine.model.named_parameters()}
    assert not any("visual" in name for name in names)
    assert "model.layers.1.self_attn.qkv_proj.bias" in names  # Qwen2's q/k/v biases
