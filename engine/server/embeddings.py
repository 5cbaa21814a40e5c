"""Pooling routes: /v1/embeddings, /score and /rerank. Scores are a cross-encoder's relevance of each text pair (a
model with a classification head reads both texts at once), else the cosine similarity of the texts' embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter, Depends

from vdeploy_engine.server.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    UsageInfo,
)
from vdeploy_engine.server.state import APIError, ServerState, server_state

router = APIRouter()
InputsT = str | list[str] | list[int] | list[list[int]]


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, state: ServerState = Depends(server_state)) -> EmbeddingResponse:
    state.check_model(body.model)
    state.require_runner("pooling", "Embeddings")
    prompts = _token_prompts(state, _with_prefix(state, body.input, body.input_type))
    vectors = await _embed(state, prompts)
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(model=state.model_name, data=data, usage=_usage(prompts))


@router.post("/score")
@router.post("/v1/score")
async def create_score(body: ScoreRequest, state: ServerState = Depends(server_state)) -> ScoreResponse:
    state.check_model(body.model)
    state.require_runner("pooling", "Score")
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not firsts or not seconds:
        raise APIError(400, "text_1 and text_2 must not be empty.", "text_1" if not firsts else "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    elif len(firsts) != len(seconds):
        raise APIError(
            400, f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1 or equal counts.", "text_2"
        )
    scores, prompts = await _scores(state, firsts, seconds)
    data = [ScoreData(index=i, score=s) for i, s in enumerate(scores)]
    return ScoreResponse(model=state.model_name, data=data, usage=_usage(prompts))


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def create_rerank(body: RerankRequest, state: ServerState = Depends(server_state)) -> RerankResponse:
    state.check_model(body.model)
    state.require_runner("pooling", "Rerank")
    if not body.documents:
        raise APIError(400, "documents must not be empty.", "documents")
    # A retrieval model that wants its roles written into the text (embedding_prefixes) gets them here.
    query, documents = body.query, body.documents
    if not state.engine.cross_encoder and {"query", "passage"} <= set(state.config.embedding_prefixes or {}):
        query, documents = _with_prefix(state, query, "query"), _with_prefix(state, documents, "passage")
    scores, prompts = await _scores(state, [query] * len(documents), documents)
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[: body.top_n]
    results = [
        RerankResult(index=i, document=RerankDocument(text=body.documents[i]), relevance_score=scores[i])
        for i in ranked
    ]
    return RerankResponse(model=state.model_name, usage=_usage(prompts), results=results)


async def _scores(state: ServerState, firsts: list[str], seconds: list[str]) -> tuple[list[float], list[list[int]]]:
    """The score of each (firsts[i], seconds[i]) and the prompts that were run."""
    if not state.engine.cross_encoder:
        prompts = _token_prompts(state, firsts + seconds)
        return _pairwise_scores(await _embed(state, prompts), len(firsts)), prompts
    pairs = [state.tokenizer(first, second) for first, second in zip(firsts, seconds, strict=True)]
    for pair in pairs:
        state.check_prompt_length(len(pair["input_ids"]), "text_2")
    timer = state.metrics.request_timer()
    results = await asyncio.gather(
        *(state.engine.embed(pair["input_ids"], pair.get("token_type_ids")) for pair in pairs)
    )
    timer.finished("stop")
    if len(results[0]) != 1:
        raise APIError(400, f"this classifier has {len(results[0])} labels; scores need a one-label cross-encoder.")
    return [r[0] for r in results], [pair["input_ids"] for pair in pairs]


def _with_prefix(state: ServerState, inputs: InputsT, input_type: str | None) -> InputsT:
    """The texts of `inputs` behind the server's prefix for `input_type` (none: as they are)."""
    if input_type is None:
        return inputs
    prefixes = state.config.embedding_prefixes or {}
    if input_type not in prefixes:
        known = f"one of {', '.join(sorted(prefixes))}" if prefixes else "none (the server has no embedding_prefixes)"
        raise APIError(400, f"input_type {input_type!r} is not one of the server's: {known}.", "input_type")
    if isinstance(inputs, str):
        return prefixes[input_type] + inputs
    if inputs and not isinstance(inputs[0], str):
        raise APIError(400, "input_type applies to text inputs, not token ids.", "input_type")
    return [prefixes[input_type] + text for text in inputs]


def _token_prompts(state: ServerState, inputs: InputsT) -> list[list[int]]:
    """Token ids of each input, every one checked against max_model_len."""
    if isinstance(inputs, str):
        prompts = [state.tokenize(inputs, param="input")]
    elif not inputs:
        raise APIError(400, "input must not be empty.", "input")
    elif isinstance(inputs[0], int):
        prompts = [list(inputs)]
    elif isinstance(inputs[0], str):
        prompts = [state.tokenize(text, param="input") for text in inputs]
    else:
        prompts = [list(ids) for ids in inputs]
    for ids in prompts:
        state.check_prompt_length(len(ids), "input")
        state.check_token_ids(ids, "input")
    return prompts


async def _embed(state: ServerState, prompts: list[list[int]]) -> list[list[float]]:
    timer = state.metrics.request_timer()
    vectors = await asyncio.gather(*(state.engine.embed(p) for p in prompts))
    timer.finished("stop")
    return vectors


def _pairwise_scores(vectors: list[list[float]], pairs: int) -> list[float]:
    """Cosine similarity of vectors[i] and vectors[pairs + i] for each i."""
    return [_cosine(vectors[i], vectors[pairs + i]) for i in range(pairs)]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
    return dot / norm if norm else 0.0


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _usage(prompts: list[list[int]]) -> UsageInfo:
    tokens = sum(len(p) for p in prompts)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
