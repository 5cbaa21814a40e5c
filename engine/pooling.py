"""The pooling runner (`runner: pooling`): embeddings from an encoder, batched across concurrent requests.

An encoder reads a whole prompt in one forward and keeps no KV cache, so its engine is small: requests queue up,
and each step runs the oldest waiting prompts that fit under `max_num_seqs` / `max_num_batched_tokens` as one flat
token batch, pools each sequence's hidden states into one vector and hands it back. Like AsyncEngine, the loop runs
on a background thread so a forward never blocks the server's event loop, and the two share their interface
(`tokenizer`, `max_model_len`, `stats()`, `is_running()`, `shutdown()`).

Pooling follows the model's sentence-transformers files when present (`1_Pooling/config.json` picks mean / CLS /
last-token; a `Normalize` module in `modules.json` turns on L2 normalisation); otherwise the model's own default (its
class's `default_pooling`: mean for jina-embeddings-v4's Qwen2.5-VL backbone), CLS for an encoder. `convert: embed`
normalises by default; `convert: reward` returns raw pooled values. A model with a classification head (a BERT cross-encoder) scores instead: each prompt, a text pair marked by its token
types, gets its labels' probabilities (a sigmoid of the logit for one label, as sentence-transformers' CrossEncoder
and vLLM's score API give; a softmax over several).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import torch

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.engine import EngineStats
from vdeploy_engine.distributed.parallel import SINGLE_WORLD, World
from vdeploy_engine.layers.attention import AttentionMetadata

logger = logging.getLogger("vdeploy_engine.pooling")

PoolingMethod = Literal["mean", "cls", "last"]


@dataclass(frozen=True)
class PoolingSpec:
    method: PoolingMethod
    normalize: bool


def pooling_spec(model_dir: str | None, convert: str, default: PoolingMethod = "cls") -> PoolingSpec:
    """The pooling a model asks for in its sentence-transformers files, else `default` (the model's)."""
    method: PoolingMethod = default
    normalize = convert != "reward"
    if model_dir is None or not os.path.isdir(model_dir):
        return PoolingSpec(method, normalize)
    pooling_file = os.path.join(model_dir, "1_Pooling", "config.json")
    if os.path.exists(pooling_file):
        with open(pooling_file) as f:
            modes = json.load(f)
        if modes.get("pooling_mode_mean_tokens"):
            method = "mean"
        elif modes.get("pooling_mode_cls_token"):
            method = "cls"
        elif modes.get("pooling_mode_lasttoken"):
            method = "last"
    modules_file = os.path.join(model_dir, "modules.json")
    if os.path.exists(modules_file) and convert != "reward":
        with open(modules_file) as f:
            normalize = any(m.get("type", "").endswith(".Normalize") for m in json.load(f))
    return PoolingSpec(method, normalize)


def pool(hidden: torch.Tensor, cu_seqlens: list[int], spec: PoolingSpec) -> torch.Tensor:
    """hidden [T, H] of a flat batch whose sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] -> [B, H] float32."""
    hidden = hidden.float()
    bounds = list(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True))
    if spec.method == "mean":
        pooled = torch.stack([hidden[s:e].mean(dim=0) for s, e in bounds])
    elif spec.method == "cls":
        pooled = hidden[[s for s, _ in bounds]]
    else:
        pooled = hidden[[e - 1 for _, e in bounds]]
    return torch.nn.functional.normalize(pooled, dim=-1) if spec.normalize else pooled


@dataclass
class _Request:
    token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    token_type_ids: list[int] | None = None  # a cross-encoder's text pair


class PoolingRunner:
    """The model on one rank. Rank 0's `run` runs the forward on every rank (the other ranks' runners take its
    message from vdeploy_engine.distributed.executor); the pooling and classification heads then run on rank 0."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, world: World = SINGLE_WORLD):
        self.model, self.world, self.device = model, world, torch.device(config.device)

    def run(self, prompts: list[list[int]], token_types: list[int] | None) -> torch.Tensor:
        self.world.broadcast(("hidden", (prompts, token_types)))
        return self.hidden(prompts, token_types)

    @torch.inference_mode()
    def hidden(self, prompts: list[list[int]], token_types: list[int] | None) -> torch.Tensor:
        """The last layer's hidden states [T, hidden] of the prompts as one flat batch (`token_types`: a
        cross-encoder's, flat)."""
        lens = [len(p) for p in prompts]
        cu_seqlens = [0, *accumulate(lens)]
        input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((len(input_ids),), -1, dtype=torch.long, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(prompts), 0), dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
        )
        if token_types is None:
            return self.model(input_ids, positions, meta)
        return self.model(input_ids, positions, meta, torch.tensor(token_types, dtype=torch.long, device=self.device))


class PoolingEngine:
    """`await engine.embed(token_ids)` -> the pooled vector (a list of floats) of one prompt; for a cross-encoder
    (`cross_encoder`), the label probabilities of a text pair (`token_type_ids` mark its second text)."""

    def __init__(self, config: EngineConfig):
        from vdeploy_engine.distributed.executor import start_executor
        from vdeploy_engine.loader import load_hf_config, load_model, load_tokenizer, resolve_model

        self.config = config
        hf_config = load_hf_config(config)
        self.tokenizer = load_tokenizer(config)
        self.executor = start_executor(config)  # the other ranks' processes, when the model is sharded
        world = self.executor.world if self.executor else SINGLE_WORLD
        self.model = load_model(config, hf_config, world.tp)
        self.runner = PoolingRunner(config, self.model, world)
        self.cross_encoder = hasattr(self.model, "classify")
        if config.convert == "classify" and not self.cross_encoder:
            raise ValueError(
                f"convert 'classify' needs a classification head; {type(self.model).__name__} has none (embed or reward)"
            )
        # The model's positions bound the context whatever the plan says (BERT: 512). Multimodal configs nest the
        # language model's.
        text_config = hf_config.get_text_config()
        positions = text_config.max_position_embeddings
        self.config = dataclasses.replace(config, max_model_len=min(config.max_model_len, positions))
        self.max_model_len = self.config.max_model_len
        self.spec = pooling_spec(
            str(resolve_model(config.model, config.revision, config.download_dir)),
            config.convert,
            getattr(self.model, "default_pooling", "cls"),
        )
        logger.info(
            "pooling runner: %s, %s pooling, normalize=%s, %d-d vectors, max_model_len=%d, up to %d prompts / %d "
            "tokens a step",
            type(self.model).__name__,
            self.spec.method,
            self.spec.normalize,
            text_config.hidden_size,
            self.max_model_len,
            config.max_num_seqs,
            config.max_num_batched_tokens,
        )
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()  # taken from _incoming, not yet run (engine thread only)
        self._running = 0
        self._prompt_tokens = 0
        self._thread = threading.Thread(target=self._run, name="pooling-loop", daemon=True)
        self._thread.start()

    async def embed(self, token_ids: list[int], token_type_ids: list[int] | None = None) -> list[float]:
        problem = self.config.prompt_length_error(len(token_ids))
        if problem:
            raise ValueError(problem)
        loop = asyncio.get_running_loop()
        request = _Request(list(token_ids), loop, loop.create_future(), token_type_ids)
        self._incoming.put(request)
        return await request.future

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self._running,
            num_waiting=len(self._waiting) + self._incoming.qsize(),
            kv_cache_usage=0.0,  # an encoder keeps no KV cache
            kv_blocks_total=0,
            kv_blocks_free=0,
            kv_waste_slots=0,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=0,
            num_preemptions_total=0,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
        )

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._incoming.put(None)
        self._thread.join(timeout=30)
        if self.executor is not None:
            self.executor.shutdown()

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while self._take_incoming(block=not self._waiting):
            batch = self._next_batch()
            self._running = len(batch)
            try:
                vectors = self._forward(batch)
            except Exception as error:  # a failed step fails its requests, not the engine
                logger.exception("pooling step failed")
                results: list = [error] * len(batch)
            else:
                results = vectors
            self._running = 0
            for request, result in zip(batch, results, strict=True):
                request.loop.call_soon_threadsafe(_resolve, request.future, result)

    def _take_incoming(self, block: bool) -> bool:
        """Moves submitted requests to the waiting queue (waiting for one when idle); False once shut down."""
        while True:
            try:
                request = self._incoming.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            self._waiting.append(request)
            block = False

    def _next_batch(self) -> list[_Request]:
        """FCFS: the oldest waiting prompts that fit the step's sequence and token limits (always at least one)."""
        batch = [self._waiting.popleft()]
        tokens = len(batch[0].token_ids)
        while (
            self._waiting
            and len(batch) < self.config.max_num_seqs
            and tokens + len(self._waiting[0].token_ids) <= self.config.max_num_batched_tokens
        ):
            batch.append(self._waiting.popleft())
            tokens += len(batch[-1].token_ids)
        self._prompt_tokens += tokens
        return batch

    @torch.inference_mode()
    def _forward(self, batch: list[_Request]) -> list[list[float]]:
        prompts = [r.token_ids for r in batch]
        cu_seqlens = [0, *accumulate(len(p) for p in prompts)]
        if not self.cross_encoder:
            return pool(self.runner.run(prompts, None), cu_seqlens, self.spec).cpu().tolist()
        types = None
        if getattr(self.model, "token_types", False):
            types = [t for r in batch for t in (r.token_type_ids or [0] * len(r.token_ids))]
        logits = self.model.classify(self.runner.run(prompts, types), cu_seqlens).float()
        if self.config.convert == "reward":  # a reward model's score is its raw logit, as vLLM returns it
            return logits.cpu().tolist()
        probabilities = logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(dim=-1)
        return probabilities.cpu().tolist()


def _resolve(future: asyncio.Future, result: list[float] | BaseException) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
