"""CPU weights in oneDNN's layout: the engine's models compute what the plain weights compute, with no second copy of
any Linear weight (only a tied LM head keeps its embedding's plain matrix beside the packed one)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.harness import forward_no_cache, load_engine_model
from vdeploy_engine.layers.embedding import LMHead
from vdeploy_engine.layers.linear import Linear, process_weights_after_loading

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [300, 301, 302, 303]]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_opt_dir"])  # untied, tied + biases, OPT
def test_packed_weights_give_the_plain_logits(fixture, request):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    plain = load_engine_model(request.getfixturevalue(fixture))
    packed = copy.deepcopy(plain)
    process_weights_after_loading(packed)
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.is_mkldnn for m in linears)  # replaced, not copied
    (head,) = [m for m in packed.modules() if isinstance(m, LMHead)]
    assert head.weight.is_mkldnn != head.tied  # a tied head keeps the embedding's plain weight for lookups
    for got, want in zip(forward_no_cache(packed, PROMPTS), forward_no_cache(plain, PROMPTS), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_other_dtypes_keep_plain_weights(tiny_llama_dir):
    model = load_engine_model(tiny_llama_dir, dtype="bfloat16")
    process_weights_after_loading(model)
    assert not any(p.is_mkldnn for p in model.parameters())
