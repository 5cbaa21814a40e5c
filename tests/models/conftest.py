"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Token ids of three sequences of different lengths, longer than the Mistral fixture's window."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 380, (n,), generator=generator).tolist() for n in (13, 5, 9)]
