"""The fused small-batch decoder path (norms folded into the projections, rotary into the KV-cache write, residual adds
into the output projections) computes what the unfused path computes. On CPU both run the torch references, so this
checks the dataflow; tests/kernels checks each Triton kernel against its reference."""

from __future__ import annotations

import pytest
import torch

from tests.models.harness import PagedRun, load_engine_model
from vdeploy_engine.models.llama import LlamaModel


def _prefill_then_decode(model, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    run = PagedRun(model, num_seqs=len(prompts), max_len=max(map(len, prompts)) + steps)
    logits = [run.step(prompts)]
    for _ in range(steps):
        logits.append(run.step([[int(t)] for t in logits[-1].argmax(-1)], decode=True))
    return logits


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])  # Qwen2 has q/k/v biases
def test_fused_path_matches_unfused(fixture, prompts, request, monkeypatch):
    model = load_engine_model(request.getfixturevalue(fixture))
    unfused = _prefill_then_decode(model, prompts, steps=3)
    monkeypatch.setattr(LlamaModel, "fuses", lambda self, hidden: True)
    fused = _prefill_then_decode(model, prompts, steps=3)
    for got, want in zip(fused, unfused, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
