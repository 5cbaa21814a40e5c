"""A real pooling replica of all-MiniLM-L6-v2 started the supervisor's way (`python -m vdeploy_engine.server --config`),
checked against sentence embeddings computed with transformers."""

from __future__ import annotations

import base64
import os
import struct

import openai
import pytest
import torch

from tests.server.conftest import run_server, write_config

pytestmark = pytest.mark.slow  # one model load per module

MODEL = "minilm"
KEY_ENV = "VDEPLOY_TEST_POOLING_KEY"
API_KEY = "pooling-secret"
PREFIXES = {"query": "query: ", "passage": "passage: "}  # e5's; jina-embeddings-v4 retrieval's are "Query: "...
TEXTS = ["The quick brown fox jumps over the lazy dog.", "深度学习改变了自然语言处理。", "Paris is in France."]


@pytest.fixture(scope="module")
def server(minilm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm")
    # A plan as `vdeploy plan --format json` writes it: the engine reads its `engine` part.
    plan = {
        "name": "minilm",
        "engine": {
            "model": str(minilm_dir),
            "served_model_name": MODEL,
            "runner": "pooling",
            "convert": "embed",
            "dtype": "float32",
            "max_model_len": 512,
            "api_key_env": KEY_ENV,
            "embedding_prefixes": PREFIXES,
        },
    }
    config = write_config(folder / "plan.json", **plan)
    env = os.environ | {KEY_ENV: API_KEY}
    with run_server(["-m", "vdeploy_engine.server", "--config", str(config)], folder / "server.log", API_KEY, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """sentence-transformers' recipe for this model, with transformers: mean over tokens, then L2 normalise."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_embeddings_match_transformers(client, reference):
    result = client.embeddings.create(model=MODEL, input=TEXTS)
    ours = torch.tensor([d.embedding for d in result.data])
    assert [d.index for d in result.data] == [0, 1, 2] and ours.shape == (3, 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    assert (cosine > 1 - 1e-4).all(), cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(TEXTS)


def test_base64_and_token_id_inputs_give_the_same_vectors(server, client):
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0]).data[0].embedding
    http = server.http()
    raw = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(decoded) // 4}f", decoded)) == pytest.approx(floats, abs=1e-7)
    ids = http.post("/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    assert by_ids == pytest.approx(floats, abs=1e-6)


def test_score_is_the_cosine_of_the_embeddings(server, client):
    query, documents = "Where is Paris?", ["Paris is in France.", "Bananas are yellow."]
    response = server.http().post("/score", json={"model": MODEL, "text_1": query, "text_2": documents})
    assert response.status_code == 200, response.text
    scores = [d["score"] for d in response.json()["data"]]
    vectors = [d.embedding for d in client.embeddings.create(model=MODEL, input=[query, *documents]).data]
    expected = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores[0] > scores[1]


def test_rerank_orders_documents_by_relevance(server):
    body = {"query": "capital of France", "documents": ["Bananas are yellow.", "Paris is the capital of France."]}
    response = server.http().post("/v1/rerank", json=body | {"top_n": 1})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [1]
    assert results[0]["document"]["text"] == "Paris is the capital of France."


def test_input_type_puts_the_servers_prefix_before_each_text(client):
    plain = [d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS[:2]).data]
    written = [d.embedding for d in client.embeddings.create(model=MODEL, input=["query: " + t for t in TEXTS[:2]]).data]
    typed = [d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS[:2],
                                                            extra_body={"input_type": "query"}).data]
    assert torch.allclose(torch.tensor(typed), torch.tensor(written), atol=1e-6)
    assert not torch.allclose(torch.tensor(typed), torch.tensor(plain), atol=1e-3)


def test_input_type_unknown_or_on_token_ids_is_400(server):
    http = server.http()
    unknown = http.post("/v1/embeddings", json={"input": "hi", "input_type": "document"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "input_type"
    assert "one of passage, query" in unknown.json()["error"]["message"]
    ids = http.post("/v1/embeddings", json={"input": [[101, 102]], "input_type": "query"})
    assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]


def test_rerank_gives_the_query_and_the_documents_their_prefixes(server, client):
    query, documents = "capital of France", ["Bananas are yellow.", "Paris is the capital of France."]
    response = server.http().post("/v1/rerank", json={"query": query, "documents": documents})
    scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    texts = ["query: " + query, *("passage: " + d for d in documents)]
    vectors = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data]
    expected = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    assert [scores[0], scores[1]] == pytest.approx(expected, abs=1e-5)


def test_generation_endpoints_on_a_pooling_model_are_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi")
    assert "The model does not support Completions API" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert "The model does not support Chat Completions API" in caught.value.message


def test_input_longer_than_max_model_len_names_both_counts(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[[1000] * 700])
    assert "512" in caught.value.message and "700" in caught.value.message


def test_api_key_from_api_key_env(server):
    import httpx

    response = httpx.post(f"{server.url}/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == 401


def test_prompt_tokens_are_counted_in_metrics(server, client):
    before = server.metrics()[f'vllm:prompt_tokens_total{{model_name="{MODEL}"}}']
    usage = client.embeddings.create(model=MODEL, input="count these tokens").usage
    after = server.metrics()[f'vllm:prompt_tokens_total{{model_name="{MODEL}"}}']
    assert after - before == usage.prompt_tokens
