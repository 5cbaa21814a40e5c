"""A BERT cross-encoder (BertForSequenceClassification, one label: a reranker's shape) with random weights: the pooling
runner scores text pairs as transformers does (sigmoid of the logit over the pair with its token types), and a real
replica serves them on /v1/score and /rerank ranked as vLLM's APIs give them."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from tests.server.conftest import run_server, write_config
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.pooling import PoolingEngine

QUERY = "Where is Paris?"
DOCUMENTS = ["Paris is the capital of France.", "The quick brown fox jumps.", "深度学习", "Paris, France, Europe."]


@pytest.fixture(scope="module")
def cross_encoder_dir(minilm_dir, tmp_path_factory):
    """A tiny random BertForSequenceClassification with all-MiniLM-L6-v2's WordPiece tokenizer (token types)."""
    import transformers

    path = tmp_path_factory.mktemp("cross-encoder")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, path / name)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=512, num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # wider than HF's init, so that every weight moves the score
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif "LayerNorm.weight" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_scores(cross_encoder_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)
    model = BertForSequenceClassification.from_pretrained(cross_encoder_dir, dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for document in DOCUMENTS:
            batch = tokenizer(QUERY, document, return_tensors="pt")
            scores.append(model(**batch).logits[0, 0].sigmoid().item())
    return scores


def test_pooling_runner_scores_pairs_like_transformers(cross_encoder_dir, reference_scores):
    engine = PoolingEngine(EngineConfig(model=str(cross_encoder_dir), runner="pooling", dtype="float32"))
    try:
        assert engine.cross_encoder
        pairs = [engine.tokenizer(QUERY, document) for document in DOCUMENTS]
        assert any(1 in pair["token_type_ids"] for pair in pairs)

        async def score_all():
            return await asyncio.gather(*(engine.embed(p["input_ids"], p["token_type_ids"]) for p in pairs))

        got = [row[0] for row in asyncio.run(score_all())]
    finally:
        engine.shutdown()
    assert got == pytest.approx(reference_scores, abs=1e-5)
    assert max(reference_scores) - min(reference_scores) > 0.05  # the fixture tells the documents apart


@pytest.mark.slow  # a real replica process
def test_score_and_rerank_routes(cross_encoder_dir, reference_scores, tmp_path):
    plan = {
        "name": "reranker",
        "engine": {"model": str(cross_encoder_dir), "served_model_name": "reranker", "runner": "pooling",
                   "convert": "classify", "dtype": "float32", "max_model_len": 512},
    }
    config = write_config(tmp_path / "plan.json", **plan)
    with run_server(["-m", "vdeploy_engine.server", "--config", str(config)], tmp_path / "server.log") as server:
        with server.http() as http:
            score = http.post("/v1/score", json={"model": "reranker", "text_1": QUERY, "text_2": DOCUMENTS})
            assert score.status_code == 200, score.text
            got = [row["score"] for row in sorted(score.json()["data"], key=lambda row: row["index"])]
            assert got == pytest.approx(reference_scores, abs=1e-5)
            rerank = http.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
            assert rerank.status_code == 200, rerank.text
            results = rerank.json()["results"]
            best = sorted(range(len(DOCUMENTS)), key=lambda i: reference_scores[i], reverse=True)[:2]
            assert [r["index"] for r in results] == best
            assert [r["document"]["text"] for r in results] == [DOCUMENTS[i] for i in best]
            assert results[0]["relevance_score"] == pytest.approx(reference_scores[best[0]], abs=1e-5)
