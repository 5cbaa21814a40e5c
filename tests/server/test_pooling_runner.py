"""The pooling runner in-process: pooling choice from sentence-transformers files, pooling maths, batching."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.pooling import PoolingEngine, PoolingSpec, pool, pooling_spec


def _model_dir(tmp_path, pooling: dict | None, modules: list | None):
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    return str(tmp_path)


NORMALIZE = [{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Normalize"}]


@pytest.mark.parametrize(
    ("pooling", "modules", "convert", "expected"),
    [
        ({"pooling_mode_mean_tokens": True}, NORMALIZE, "embed", PoolingSpec("mean", True)),
        ({"pooling_mode_cls_token": True}, NORMALIZE[:1], "embed", PoolingSpec("cls", False)),
        ({"pooling_mode_lasttoken": True}, None, "embed", PoolingSpec("last", True)),
        (None, None, "embed", PoolingSpec("cls", True)),  # an encoder without sentence-transformers files
        ({"pooling_mode_mean_tokens": True}, NORMALIZE, "reward", PoolingSpec("mean", False)),
    ],
)
def test_pooling_spec_follows_the_model_files(tmp_path, pooling, modules, convert, expected):
    assert pooling_spec(_model_dir(tmp_path, pooling, modules), convert) == expected


def test_pool_methods_per_sequence():
    hidden = torch.arange(10, dtype=torch.float32).repeat_interleave(2).view(10, 2)  # row i = [i, i]
    cu_seqlens = [0, 3, 10]
    assert pool(hidden, cu_seqlens, PoolingSpec("mean", False)).tolist() == [[1, 1], [6, 6]]
    assert pool(hidden, cu_seqlens, PoolingSpec("cls", False)).tolist() == [[0, 0], [3, 3]]
    assert pool(hidden, cu_seqlens, PoolingSpec("last", False)).tolist() == [[2, 2], [9, 9]]
    normalized = pool(hidden, cu_seqlens, PoolingSpec("last", True))
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(2))


def test_batching_under_tight_limits_gives_the_same_vectors(minilm_dir):
    # 2 sequences or 24 tokens a step: the 12 prompts below need several steps, and each must pool to the same
    # vector as when it runs alone.
    config = EngineConfig(
        model=str(minilm_dir),
        runner="pooling",
        convert="embed",
        dtype="float32",
        max_num_seqs=2,
        max_num_batched_tokens=24,
    )
    engine = PoolingEngine(config)
    try:
        prompts = [engine.tokenizer.encode(f"sentence number {i} " * (1 + i % 3)) for i in range(12)]

        async def embed_all():
            return await asyncio.gather(*(engine.embed(p) for p in prompts))

        async def embed_one(p):
            return await engine.embed(p)

        together = torch.tensor(asyncio.run(embed_all()))
        alone = torch.tensor([asyncio.run(embed_one(p)) for p in prompts])
        assert torch.allclose(together, alone, atol=1e-5)
        assert engine.stats().prompt_tokens_total == 2 * sum(len(p) for p in prompts)
        with pytest.raises(ValueError, match="512"):
            asyncio.run(embed_one([101] * 600))
    finally:
        engine.shutdown()
    assert not engine.is_running()


def test_classify_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="classify"):
        PoolingEngine(EngineConfig(model=str(tmp_path), runner="pooling", convert="classify"))
