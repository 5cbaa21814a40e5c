"""Helpers the engine tests import (this folder is on sys.path while they run)."""

import random


def random_prompts(count: int, min_len: int, max_len: int, seed: int = 0, vocab: int = 380) -> list[list[int]]:
    """Deterministic prompts of random token ids (below the tiny tokenizer's special tokens' range)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]
