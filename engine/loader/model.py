"""Building a model module and loading its weights, tensor by tensor, from an HF directory or a GGUF file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vdeploy_engine import progress
from vdeploy_engine.config import PIPELINE_ARCHITECTURES, EngineConfig
from vdeploy_engine.distributed.parallel import SINGLE, WHOLE, Stage, TPGroup
from vdeploy_engine.layers.linear import WeightShapeError, default_weight_loader
from vdeploy_engine.loader.errors import ModelLoadError
from vdeploy_engine.loader.hub import is_gguf, resolve_model
from vdeploy_engine.models.registry import model_class
from vdeploy_engine.worker.memory_use import return_large_blocks_when_freed


@contextmanager
def _building_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created directly on the target device in the target dtype (no float32 copy on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: EngineConfig, hf_config: Any, tp: TPGroup = SINGLE, stage: Stage = WHOLE) -> nn.Module:
    """The model for `config` on `config.device` in `config.dtype`, weights loaded, in eval mode; under tensor
    parallelism, this rank's slice of it; under pipeline parallelism, its stage's layers."""
    if config.device == "cpu":
        return_large_blocks_when_freed()  # so that the process's memory is what its tensors hold, run after run
    cls = model_class(hf_config)
    _check_quantization(config, hf_config)
    if stage.size > 1 and cls.__name__ not in PIPELINE_ARCHITECTURES:
        raise ModelLoadError(f"{cls.__name__} cannot be split into pipeline stages (pipeline_parallel_size "
                             f"{stage.size}); the built-in engine splits {', '.join(sorted(PIPELINE_ARCHITECTURES))}")
    with _building_on(config.device, getattr(torch, config.dtype)):
        if stage.size > 1:
            model = cls(hf_config, tp, stage)
        else:
            model = cls(hf_config, tp) if tp.size > 1 else cls(hf_config)
    path = resolve_model(config.model, config.revision, config.download_dir)
    if is_gguf(path):
        from vdeploy_engine.loader.gguf import iter_gguf

        weights = iter_gguf(path, hf_config)
    else:
        from vdeploy_engine.loader.checkpoint import iter_checkpoint

        weights = iter_checkpoint(path)
    load_weights(model, weights, source=str(path))
    return model.eval()


def _check_quantization(config: EngineConfig, hf_config: Any) -> None:
    """Quantized linear methods are not written yet (engine.layers.linear.QuantMethod is where they go); GGUF files
    are dequantized at load. Refuse the rest before reading gigabytes of packed weights."""
    stored = getattr(hf_config, "quantization_config", None)
    if isinstance(stored, dict):
        stored = stored.get("quant_method", "unknown")
    elif stored is not None:
        stored = getattr(stored, "quant_method", "unknown")
    method = stored or config.quantization
    if method not in (None, "gguf"):
        where = "the checkpoint is quantized with" if stored else "quantization:"
        raise ModelLoadError(
            f"{where} {method}, which the built-in engine cannot run yet (it runs unquantized checkpoints and GGUF "
            "files, which it dequantizes); use an unquantized or GGUF model, or backend: vllm"
        )


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Places each checkpoint tensor with the model's `map_checkpoint_name` and the parameter's `weight_loader`, then
    checks that every parameter (every shard of a fused one) was filled."""
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    absent = tuple(getattr(model, "absent_prefixes", ()))
    arch = type(model).__name__
    expected = [(name, shard) for name, param in params.items()
                for shard in (getattr(param, "shard_names", None) or (None,))]
    filled: set[tuple[str, str | None]] = set()
    loading = progress.Progress("loading", len(expected), "weights", "Loading weights")
    with torch.no_grad():
        for name, tensor in weights:
            target = model.map_checkpoint_name(name)
            if target is None:
                continue
            param_name, shard = target
            param = params.get(param_name)
            if param is None and param_name.startswith(absent):
                continue  # another pipeline stage holds it
            if param is None:
                raise ModelLoadError(f"{source}: tensor {name!r} has no place in {arch}")
            try:
                if shard is None:
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard)
            except WeightShapeError as exc:
                raise ModelLoadError(
                    f"{source}: tensor {name!r}: {exc} (does config.json match the weights?)"
                ) from None
            filled.add((param_name, shard))
            loading.update_to(len(filled))
    loading.close()
    missing = [f"{name}[{shard}]" if shard else name for name, shard in expected if (name, shard) not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks weights for {arch}: {shown}")
