"""Loading helpers shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.config import EngineConfig
from engine.loader import load_hf_config, load_model


def load_engine_model(path: Path | str, dtype: str = "float32") -> torch.nn.Module:
    config = EngineConfig(model=str(path), dtype=dtype)
    return load_model(config, load_hf_config(config))


def reference_logits(path: Path | str, sequences: list[list[int]], **kwargs) -> list[torch.Tensor]:
    """transformers' logits for each sequence on its own, float32."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0] for s in sequences]


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Token ids of three sequences of different lengths, longer than the Mistral fixture's window."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 380, (n,), generator=generator).tolist() for n in (13, 5, 9)]
