"""A decoder with a score head (transformers' Qwen2ForSequenceClassification, one label: a reward model's or a decoder
reranker's shape) with random weights: the pooling runner scores each text from its last token as transformers does,
raw for `convert: reward` (vLLM's reward values), through a sigmoid for `convert: classify`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.fixtures.tiny_models import save_tiny_tokenizer
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.pooling import PoolingEngine

TEXTS = ["The answer is 42.", "I do not know.", "Paris is the capital of France.", "2 + 2 = 5"]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("reward-model")
    tokenizer = save_tiny_tokenizer(path)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForSequenceClassification"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForSequenceClassification(config).eval()
    with torch.no_grad():  # wider than HF's init, so that the texts' scores differ clearly
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_logits(reward_model_dir):
    from transformers import AutoTokenizer, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = Qwen2ForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in TEXTS]


def _scores(model_dir, convert: str) -> list[float]:
    engine = PoolingEngine(EngineConfig(model=str(model_dir), runner="pooling", convert=convert, dtype="float32"))
    try:
        assert engine.cross_encoder

        async def score_all():
            return await asyncio.gather(*(engine.embed(engine.tokenizer(text)["input_ids"]) for text in TEXTS))

        return [row[0] for row in asyncio.run(score_all())]
    finally:
        engine.shutdown()


def test_reward_is_the_raw_logit_of_the_last_token(reward_model_dir, reference_logits):
    assert _scores(reward_model_dir, "reward") == pytest.approx(reference_logits, abs=1e-4)
    assert max(reference_logits) - min(reference_logits) > 0.1  # the fixture tells the texts apart


def test_classify_gives_the_probability(reward_model_dir, reference_logits):
    expected = torch.tensor(reference_logits).sigmoid().tolist()
    assert _scores(reward_model_dir, "classify") == pytest.approx(expected, abs=1e-5)
