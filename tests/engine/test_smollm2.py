"""The real SmolLM2-135M-Instruct GGUF: greedy tokens identical to transformers reading the same file."""

from __future__ import annotations

import pytest
import torch

from vdeploy_engine import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "深度学习是",
    "请介绍一下北京的历史。",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llm(smollm2_gguf_path):
    return LLM(str(smollm2_gguf_path), dtype="float32", max_model_len=256, device="cpu")


@pytest.mark.slow
def test_greedy_tokens_match_transformers_in_english_and_chinese(llm, smollm2_gguf_path):
    from transformers import AutoModelForCausalLM

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)

    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        prompt = torch.tensor([output.prompt_token_ids])
        expected = hf.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False)[0, prompt.shape[1] :].tolist()
        completion = output.outputs[0]
        assert completion.token_ids == expected, output.prompt
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert any(ord(c) > 0x4E00 for o in outputs[2:] for c in o.outputs[0].text)  # it did answer in Chinese


@pytest.mark.slow
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sampled_text_equals_the_decode_of_its_tokens(llm, skip_special_tokens):
    """Sampled Chinese cut at random lengths ends mid-character now and then: the text then ends in U+FFFD, as the
    tokenizer's decode does (and vLLM's), rather than dropping the bytes. An EOS that ends a sequence is not text."""
    tokenizer = llm.get_tokenizer()
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=1 + seed % 13, skip_special_tokens=skip_special_tokens)
        for seed in range(24)
    ]
    outputs = llm.generate(["请介绍一下北京的历史。"] * len(params), params, use_tqdm=False)
    cut = 0
    for output in outputs:
        completion = output.outputs[0]
        ids = completion.token_ids
        if completion.finish_reason == "stop":
            ids = ids[:-1]
        decoded = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert completion.text == decoded, ids
        cut += decoded.endswith("\ufffd")
    assert cut > 0  # some sequence did end in the middle of a character
