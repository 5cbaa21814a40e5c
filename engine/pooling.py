"""The pooling runner (`runner: pooling`): embeddings from an encoder, batched across concurrent requests.

An encoder reads a whole prompt in one forward and keeps no KV cache, so its engine is small: requests queue up,
and each step runs every waiting prompt that fits under `max_num_seqs` / `max_num_batched_tokens` as one flat token
batch, pools each sequence's hidden states into one vector and resolves its future.

Pooling follows the model's sentence-transformers files when present (`1_Pooling/config.json` picks mean / CLS /
last-token; a `Normalize` module in `modules.json` turns on L2 normalisation); otherwise an encoder pools CLS and a
decoder its last token. `convert: embed` normalises by default; `convert: reward` returns raw pooled values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.config import EngineConfig
from engine.layers.attention import AttentionMetadata

logger = logging.getLogger("engine.pooling")

PoolingMethod = Literal["mean", "cls", "last"]


@dataclass(frozen=True)
class PoolingSpec:
    method: PoolingMethod
    normalize: bool


def pooling_spec(model_dir: str | None, convert: str, is_encoder: bool) -> PoolingSpec:
    """The pooling a model asks for in its sentence-transformers files, else the default for its kind."""
    method: PoolingMethod = "cls" if is_encoder else "last"
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
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class PoolingEngine:
    """`await engine.embed(token_ids)` -> the pooled vector (list of floats) for one prompt.

    Construct inside a running event loop's thread (the server's start-up hook); `start()` launches the batching loop.
    """

    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig, AutoTokenizer

        from engine.models.bert import BertModel

        self.config = config
        self.hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        architecture = (self.hf_config.architectures or ["?"])[0]
        if architecture not in ("BertModel", "BertForMaskedLM", "BertForPreTraining"):
            raise ValueError(f"runner 'pooling' supports BERT encoders; {config.model} is a {architecture}")
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.max_model_len = min(config.max_model_len, self.hf_config.max_position_embeddings)
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.model = BertModel(self.hf_config)
        self.model.load_weights(_safetensors_weights(config.model))
        self.model.to(self.device, self.dtype).eval()
        self.spec = pooling_spec(config.model, config.convert, is_encoder=True)
        self.embedding_size = self.hf_config.hidden_size
        logger.info(
            "pooling runner: %s, %s pooling, normalize=%s, max_model_len=%d, dtype=%s",
            architecture,
            self.spec.method,
            self.spec.normalize,
            self.max_model_len,
            config.dtype,
        )
        self._waiting: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._running = 0
        self._prompt_tokens = 0
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def embed(self, token_ids: list[int]) -> list[float]:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens, "
                f"but the input has {len(token_ids)} tokens."
            )
        request = _Request(token_ids, asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        self._wakeup.set()
        return await request.future

    def stats(self) -> dict[str, float]:
        return {
            "num_requests_running": self._running,
            "num_requests_waiting": len(self._waiting),
            "kv_cache_usage": 0.0,  # an encoder keeps no KV cache
            "prompt_tokens": self._prompt_tokens,
            "generation_tokens": 0,
            "num_preemptions": 0,
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
        }

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                batch = self._next_batch()
                self._running = len(batch)
                try:
                    vectors = await asyncio.to_thread(self._forward, [r.token_ids for r in batch])
                except Exception as error:  # a failed step fails its requests, not the server
                    logger.exception("pooling step failed")
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(error)
                else:
                    for request, vector in zip(batch, vectors, strict=True):
                        if not request.future.done():  # the client may have gone away
                            request.future.set_result(vector)
                finally:
                    self._running = 0

    def _next_batch(self) -> list[_Request]:
        """FCFS: the oldest waiting prompts that fit the step's sequence and token limits (always at least one)."""
        batch, tokens = [], 0
        for request in self._waiting:
            if batch and (
                len(batch) == self.config.max_num_seqs
                or tokens + len(request.token_ids) > self.config.max_num_batched_tokens
            ):
                break
            batch.append(request)
            tokens += len(request.token_ids)
        del self._waiting[: len(batch)]
        self._prompt_tokens += tokens
        return batch

    @torch.inference_mode()
    def _forward(self, prompts: list[list[int]]) -> list[list[float]]:
        lens = [len(p) for p in prompts]
        cu_seqlens = [0]
        for n in lens:
            cu_seqlens.append(cu_seqlens[-1] + n)
        input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((len(input_ids),), -1, dtype=torch.long, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(prompts), 0), dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
        )
        hidden = self.model(input_ids, positions, meta)
        return pool(hidden, cu_seqlens, self.spec).cpu().tolist()


def _safetensors_weights(model_dir: str):
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no .safetensors weights found")
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
