"""Incremental detokenisation against the one-shot decode of the same tokens."""

import pytest

from vdeploy_engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "深度学习模型的推理服务需要高效的内存管理。",
    "Hello, my name is vdeploy. 你好，世界！",
    "def main():\n    print('hello world')\n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_text_and_are_never_half_a_character(tokenizer, text):
    prompt = tokenizer.encode("The quick brown fox")
    tokens = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(t) for t in tokens]
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    # The tiny tokenizer splits Chinese characters into byte tokens, so some steps must have waited.
    if any(ord(c) > 0x2E80 for c in text):
        assert "" in pieces


def test_special_tokens_are_skipped_or_kept(tokenizer):
    tokens = tokenizer.encode("Hello") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    skipped = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(skipped.step(t) for t in tokens) == "Hello"
    assert "".join(kept.step(t) for t in tokens) == "Hello<|im_end|>"


def test_fork_continues_independently(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    first = "".join(detok.step(t) for t in tokenizer.encode("Hello, "))
    child = detok.fork()
    a = "".join(detok.step(t) for t in tokenizer.encode("world"))
    b = "".join(child.step(t) for t in tokenizer.encode("Paris"))
    assert (first + a, first + b) == ("Hello, world", "Hello, Paris")
