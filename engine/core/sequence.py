"""Requests and their sequences: the state the scheduler, the KV cache manager and the output processor share.

A Request owns `n` Sequences. With n > 1 it starts as one sequence; when its prompt has been computed the sequence is
forked into n, which share the prompt's KV blocks (copy-on-write) and then decode independently.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from vdeploy_engine.detokenizer import IncrementalDetokenizer
from vdeploy_engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, SampleLogprobs
from vdeploy_engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_ids = itertools.count()
PENDING_TOKEN = -1  # stands for a token a launched step is still computing (LLMEngine's run-ahead)


class Sequence:
    def __init__(self, request: Request, index: int, token_ids: list[int], detokenizer: IncrementalDetokenizer):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # which of the request's n completions
        self.token_ids = token_ids  # prompt + generated
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []  # GPU block ids, or CPU block ids while swapped out
        self.block_hashes: list[int] = []  # chained hashes of the full blocks computed so far (prefix caching)
        self.generator: Any = None  # torch.Generator for seeded sampling; set by the sampler on first use
        self.grammar: Any = None  # the structured-output matcher (its own state); made by the engine on first use
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: SampleLogprobs | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def fork(self, index: int) -> Sequence:
        child = Sequence(self.request, index, list(self.token_ids), self.detokenizer.fork())
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.text, child.cumulative_logprob = self.text, self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        return child

    def completion(self, holdback: int) -> CompletionOutput:
        """The output so far; `holdback` trailing characters stay hidden while they could still begin a stop string."""
        text = self.text if self.finished or holdback == 0 else self.text[: max(len(self.text) - holdback, 0)]
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.seqs = [Sequence(self, 0, list(prompt_token_ids), detokenizer)]
        self.stop_holdback = max((len(s) for s in params.stop_strings), default=1) - 1

    @property
    def pending_forks(self) -> int:
        """Children still to be forked from the first sequence (n > 1, prompt not yet sampled)."""
        return self.params.n - len(self.seqs)

    @property
    def finished(self) -> bool:
        # Forking happens at the first sample, before any stop check, so an unforked request only ends by abort.
        return all(seq.finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        completions = [seq.completion(self.stop_holdback) for seq in self.seqs]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=self.finished,
            metrics=self.metrics,
        )
