"""Structured outputs: token masks that keep a sequence inside a grammar (a JSON schema, any JSON object, a regex,
a choice of strings, an EBNF grammar), from xgrammar (bench/structured_masks.py: its masks were 5-43x faster than
llguidance's on SmolLM2's vocabulary).

Grammars are compiled once per distinct constraint (cached; the server compiles on a worker thread before the
request reaches the engine loop). Each constrained sequence has its own matcher. The engine computes a step's masks
on a worker thread while the model's forward pass runs, so they cost the step nothing when they take less time
than the forward; the sampler then applies them to the constrained rows only.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vdeploy_engine.sampling_params import StructuredOutputs


class StructuredOutputError(ValueError):
    """The constraint cannot be compiled (an invalid schema, regex or grammar); the server answers 400."""


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._compiled: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks")

    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled grammar of `spec` (cached). Raises StructuredOutputError naming what is wrong."""
        key = spec.key
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(*key)
            with self._lock:
                self._compiled[key] = compiled
        return compiled

    def _compile(self, kind: str, text: str) -> Any:
        compiler = self._compiler
        # No free whitespace between JSON tokens: small models otherwise wander into endless newlines.
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(choice) for choice in json.loads(text))
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StructuredOutputError(f"structured_outputs: invalid {kind}: {first_line}") from None

    def matcher(self, spec: StructuredOutputs) -> Any:
        return self._xgr.GrammarMatcher(self.compile(spec))

    def start_masks(self, matchers: list[Any | None]) -> Future:
        """Computes on a worker thread the bitmask [rows, words] of each row's matcher (None: unconstrained row,
        every token allowed); result() waits for it."""
        return self._workers.submit(self._fill, matchers)

    def _fill(self, matchers: list[Any | None]) -> torch.Tensor:
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # all tokens allowed
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                matcher.fill_next_token_bitmask(bitmask, row)
        return bitmask

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Sets the logits of tokens each listed row's mask forbids to -inf, in place. Plain torch (bit i of word w
        allows token 32 * w + i), so it runs wherever the logits are, with no kernel of the library's to build."""
        index = torch.tensor(rows, device=logits.device)
        words = bitmask.to(logits.device, non_blocking=True)[index]
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]].bool()
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
