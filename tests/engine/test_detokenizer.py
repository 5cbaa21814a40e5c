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


# ---------------------------------------------------------------------------------------------------- property


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf_path):
    from vdeploy_engine.config import EngineConfig
    from vdeploy_engine.loader import load_tokenizer

    return load_tokenizer(EngineConfig(model=str(smollm2_gguf_path)))


@pytest.mark.slow
def test_pieces_and_flush_equal_the_decode_of_random_tokens(smollm2_tokenizer):
    """Any token sequence of the real SmolLM2 tokenizer, byte tokens and special tokens included: the pieces plus the
    final flush are exactly `tokenizer.decode(tokens, skip_special_tokens=...)`, U+FFFD for invalid UTF-8 included,
    and no piece but the flush ends in the middle of a character."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizer = smollm2_tokenizer
    vocab = len(tokenizer)
    # Tokens that are part of a UTF-8 character (one byte, or a few bytes of a longer character) and special tokens
    # are where incremental decoding goes wrong; draw them often.
    partial = [t for t in range(vocab) if tokenizer.decode([t]) == "\ufffd"]
    special = sorted(set(tokenizer.all_special_ids))
    token = st.one_of(st.sampled_from(partial), st.sampled_from(special), st.integers(0, vocab - 1))
    prompt = tokenizer.encode("Translate: ")
    assert len(partial) > 64 and special

    @settings(max_examples=400, deadline=None)
    @given(tokens=st.lists(token, max_size=24), skip=st.booleans())
    def check(tokens: list[int], skip: bool) -> None:
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        pieces = [detok.step(t) for t in tokens]
        assert "".join(pieces) + detok.flush() == tokenizer.decode(tokens, skip_special_tokens=skip)
        assert not any(piece.endswith("\ufffd") for piece in pieces)
        assert detok.flush() == ""

    check()
