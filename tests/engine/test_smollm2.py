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


@pytest.mark.slow
def test_greedy_tokens_match_transformers_in_english_and_chinese(smollm2_gguf_path):
    from transformers import AutoModelForCausalLM

    llm = LLM(str(smollm2_gguf_path), dtype="float32", max_model_len=256, device="cpu")
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
        # Streaming detokenisation adds up to the one-shot decode, except that it never emits half a character
        # (max_tokens may cut one in two: the one-shot decode then ends in U+FFFD).
        full = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.text == full.removesuffix("\ufffd")
        assert "\ufffd" not in completion.text
    assert any(ord(c) > 0x4E00 for o in outputs[2:] for c in o.outputs[0].text)  # it did answer in Chinese
