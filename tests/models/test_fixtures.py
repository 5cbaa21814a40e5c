"""The shared fixtures build real checkpoints that transformers itself loads and runs."""

import torch
import transformers


def test_tiny_fixtures_are_loadable_hf_checkpoints(tiny_llama_dir, tiny_qwen2_dir, tiny_mistral_dir, tiny_opt_dir):
    for path in (tiny_llama_dir, tiny_qwen2_dir, tiny_mistral_dir, tiny_opt_dir):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        ids = tokenizer("你好，世界! Hello", return_tensors="pt").input_ids
        assert tokenizer.decode(ids[0]) == "你好，世界! Hello"  # byte-level BPE round-trips Chinese
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        assert logits.std() > 0.3  # weights wide enough that a wrong tensor shows in the logits
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
