"""Incremental detokenisation: turn one new token at a time into new text without ever emitting half a character.

A byte-level BPE token can hold part of a UTF-8 character (most Chinese characters span two or three tokens) and a
SentencePiece token's leading space depends on its left neighbour. So each step decodes a short window of recent
tokens twice — with and without the tokens not yet emitted — and emits the difference, unless the window still ends
in an incomplete character (decoded as U+FFFD), in which case it waits for the next token. When the sequence ends,
`flush` emits what is still waiting, U+FFFD included: the whole text then equals the tokenizer's decode of the tokens,
as transformers and vLLM show it.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

_CONTEXT_TOKENS = 5  # earlier tokens decoded with each window, so spacing and merges come out right


def _decoder(tokenizer: Any) -> Any:
    """The Rust tokenizer's own decode when it gives the same text as the transformers wrapper (no clean-up pass):
    a third of the cost, which adds up at hundreds of sequences per step. Otherwise the wrapper's."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode
    return tokenizer.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.tokens)  # tokens before this are already emitted

    @functools.cached_property
    def decode(self) -> Any:
        return _decoder(self.tokenizer)

    def step(self, token_id: int) -> str:
        """Adds a token; returns the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text of the tokens still held back (an incomplete or invalid UTF-8 sequence at the end), once no
        token follows."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.decode
        emitted = decode(
            self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens
        )
        window = decode(self.tokens[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(window) <= len(emitted) or (window.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return window[len(emitted) :]

    def fork(self) -> IncrementalDetokenizer:
        child = copy.copy(self)
        child.tokens = list(self.tokens)
        return child
