"""LLMEngine: the synchronous engine loop shared by `LLM` (offline) and `AsyncEngine` (serving).

`add_request` tokenises and queues; each `step()` schedules, runs the model once, samples, appends tokens, detokenises,
applies stop conditions and returns a cumulative RequestOutput for every request that progressed.

A step that raises fails the requests it was serving, not the engine: they are aborted (their KV blocks freed) and
`RequestFailedError` names them, so the caller can hand each its error and step on. Only a device fault (CUDA error,
out of memory) propagates as it is: the device state is then unknown and the process must be restarted.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.kv_cache import KVCacheManager
from vdeploy_engine.core.scheduler import Scheduler, SchedulerOutput
from vdeploy_engine.core.sequence import PENDING_TOKEN, Request, Sequence
from vdeploy_engine.outputs import Logprob, RequestOutput
from vdeploy_engine.sampling_params import SamplingParams, SamplingParamsError


class InvalidPromptError(ValueError):
    """The client sent a prompt the model cannot take: empty, longer than max_model_len, or with unknown token ids
    (the server answers 400)."""


class RequestFailedError(RuntimeError):
    """Serving these requests raised (their step failed for a reason other than a device fault): they were aborted
    and the engine can go on. The cause is chained."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the request failed in the engine: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.__cause__ = cause


_DEVICE_FAULT_TEXT = (
    "CUDA error",
    "CUBLAS_STATUS",
    "cuDNN error",
    "device-side assert",
    "illegal memory access",
    "out of memory",
    "NCCL error",
)


def is_device_fault(error: BaseException) -> bool:
    """Errors after which the device (or the host's memory) cannot be trusted: the process must be restarted."""
    import torch

    fatal = (MemoryError, torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", MemoryError))
    if isinstance(error, fatal):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _DEVICE_FAULT_TEXT)


@dataclass
class EngineStats:
    """Counters behind vLLM's Prometheus metrics (totals count since start)."""

    num_running: int
    num_waiting: int  # includes swapped-out sequences
    kv_cache_usage: float  # fraction of KV blocks in use
    kv_blocks_total: int
    kv_blocks_free: int
    kv_waste_slots: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up
    prefix_cache_hits_total: int  # of which found in the cache


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any, model: Any, executor: Any = None):
        from vdeploy_engine.worker.model_runner import ModelRunner

        self.config = config
        self.tokenizer = tokenizer
        self.executor = executor  # the other ranks' processes, when the model is sharded over several
        self.runner = ModelRunner(config, model, *([executor.world] if executor else []))
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.block_size, self.runner.num_cpu_blocks, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.kv)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = _eos_token_ids(tokenizer, model)
        # Token ids a request may name: those both the tokenizer and the model's embedding and logits know.
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_size = min(len(tokenizer), model_vocab) if isinstance(model_vocab, int) else len(tokenizer)
        self._batch: list[str] = []  # ids of the requests the current step serves (failed together if it raises)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._in_flight: _InFlight | None = None  # a decode step launched ahead, its tokens not yet taken
        self._structured_outputs: Any = None  # StructuredOutputManager, made for the first constrained request
        self._structured_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        import torch

        from vdeploy_engine.distributed.executor import start_executor
        from vdeploy_engine.layers.linear import process_weights_after_loading
        from vdeploy_engine.loader import load_hf_config, load_model, load_tokenizer

        torch.manual_seed(config.seed)
        hf_config = load_hf_config(config)
        executor = start_executor(config)
        model = load_model(config, hf_config, *([executor.world.tp, executor.world.stage] if executor else []))
        process_weights_after_loading(model)  # e.g. oneDNN's weight layout on the CPU
        return cls(config, load_tokenizer(config), model, executor)

    def shutdown(self) -> None:
        """Stops the other ranks' processes, if any."""
        if self.executor is not None:
            self.executor.shutdown()

    # -- requests ------------------------------------------------------------------------------------------------

    def check_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Tokenises a prompt (text or token ids) and checks it fits; returns (text, token ids)."""
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        problem = self.config.prompt_length_error(len(token_ids))
        if problem:
            raise InvalidPromptError(problem)
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidPromptError(f"the prompt holds token ids outside the vocabulary (0..{self.vocab_size - 1})")
        return text, token_ids

    def check_params(self, params: SamplingParams) -> None:
        """Refuses sampling parameters this model cannot honour (token ids past its vocabulary) with a
        SamplingParamsError naming the field; the ranges the model does not decide are SamplingParams' own checks."""
        bad = next((t for t in params.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise SamplingParamsError("stop_token_ids", f"{bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        outside = sorted(t for t in params.logit_bias or {} if t >= self.vocab_size)
        if outside:
            raise SamplingParamsError(
                "logit_bias", f"token ids {outside[:5]} are outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise SamplingParamsError("logprobs", f"must be <= the vocabulary size {self.vocab_size}")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Request:
        """Queues a request. `prompt_token_ids`, when given, are the already checked tokens of the text `prompt`."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            prompt, prompt_token_ids = self.check_prompt(prompt)
        self.check_params(params)
        if params.structured_outputs is not None:
            self.structured_outputs.compile(params.structured_outputs)  # cached; raises on an invalid constraint
        request = Request(request_id, prompt, prompt_token_ids, params, self.tokenizer, arrival_time)
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its KV blocks; returns its final output (None if it was unknown or done)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics.finished_time = time.time()
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop ------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step. Raises RequestFailedError (its requests aborted) when serving them raised, or the
        device fault itself."""
        try:
            return self._step()
        except Exception as error:
            if is_device_fault(error) or not self._batch:
                raise
            failed, self._batch, self._in_flight = self._batch, [], None
            for request_id in failed:
                self.abort_request(request_id)
            raise RequestFailedError(failed, error) from error

    def _step(self) -> list[RequestOutput]:
        self._batch = [] if self._in_flight is None else _request_ids(self._in_flight.seqs)
        if self._in_flight is not None and not self._in_flight_continues():
            return self._land()  # the batch changes: its tokens are needed before scheduling
        step = self.scheduler.schedule()
        self._batch = list(dict.fromkeys(self._batch + _request_ids(seq for seq, _ in step.scheduled)))
        if not step.scheduled:
            return self._land() if self._in_flight is not None else []
        sampling = [seq for seq, n in step.scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        if self._in_flight is not None or self._may_run_ahead(step, sampling):
            return self._run_ahead(step, sampling)
        masks = self._start_token_masks(sampling)  # computed while the forward pass runs
        logits = self.runner.execute(step, sampling)
        self.scheduler.update(step)
        sample_seqs, rows = self._fork_new_completions(sampling)
        if len(rows) != len(sampling):  # forked children read their parent's row
            logits = logits[rows]
        apply_masks = None
        if masks is not None:
            bitmask = masks.result()[rows]  # a forked child starts in its parent's grammar state
            constrained = [i for i, seq in enumerate(sample_seqs) if seq.request.params.structured_outputs]
            apply_masks = functools.partial(self.structured_outputs.apply, bitmask=bitmask, rows=constrained)
        out = self.runner.sample(logits, sample_seqs, [self._early_stop_ids(s) for s in sample_seqs], apply_masks)
        return self._take_samples(sample_seqs, out.token_ids, out.logprobs)

    # -- structured outputs --------------------------------------------------------------------------------------

    @property
    def structured_outputs(self) -> Any:
        """The StructuredOutputManager (its tokenizer tables take seconds to build: made on first use, once)."""
        with self._structured_lock:
            if self._structured_outputs is None:
                from vdeploy_engine.structured_output import StructuredOutputManager

                config = getattr(self.runner.model, "config", None)
                vocab = getattr(config, "vocab_size", None) or len(self.tokenizer)
                self._structured_outputs = StructuredOutputManager(self.tokenizer, vocab, self.eos_token_ids)
            return self._structured_outputs

    def _grammar(self, seq: Sequence) -> Any:
        if seq.grammar is None:
            seq.grammar = self.structured_outputs.matcher(seq.request.params.structured_outputs)
        return seq.grammar

    def _start_token_masks(self, sampling: list[Sequence]) -> Future | None:
        """The token masks of this step's constrained rows, computed on a worker thread; None when none is."""
        if not any(seq.request.params.structured_outputs for seq in sampling):
            return None
        matchers = [self._grammar(seq) if seq.request.params.structured_outputs else None for seq in sampling]
        return self.structured_outputs.start_masks(matchers)

    def _take_samples(
        self, seqs: list[Sequence], token_ids: list[int], logprobs: list[list[tuple[int, float, int]] | None]
    ) -> list[RequestOutput]:
        """Appends each sequence's new token, applies stop conditions; returns the progressed requests' outputs."""
        now = time.time()
        progressed: dict[str, Request] = {}
        for seq, token, token_logprobs in zip(seqs, token_ids, logprobs, strict=True):
            self._append(seq, token, token_logprobs)
            progressed[seq.request.request_id] = seq.request
        self.generation_tokens_total += len(seqs)
        outputs = []
        for request in progressed.values():
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                self.prompt_tokens_total += len(request.prompt_token_ids)
            metrics.last_token_time = now
            metrics.token_times.append(now)
            if request.finished:
                metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(request.output())
        return outputs

    # -- running one decode step ahead ---------------------------------------------------------------------------
    # At batch 1 the host's work per step (scheduling, detokenising, stop checks) is as long as the GPU's forward
    # pass. A plain greedy decode batch therefore launches its next step before taking this step's tokens: the
    # graph feeds its own argmax back as the next input on the device, each sequence holds a PENDING_TOKEN for the
    # token in flight, and the host takes (lands) a step's tokens while the GPU runs the next one. A sequence that
    # stops wastes its row of the step already in flight; any change of batch lands first (vLLM's async scheduling).

    def _may_run_ahead(self, step: SchedulerOutput, sampling: list[Sequence]) -> bool:
        return (
            len(sampling) == len(step.scheduled)
            and self.runner.can_run_ahead(step)
            and all(_runs_ahead(seq.request.params) and not self._early_stop_ids(seq) for seq in sampling)
        )

    def _in_flight_continues(self) -> bool:
        """Whether the next step would decode exactly the sequences in flight, in their order, without preempting."""
        scheduler = self.scheduler
        return (
            not scheduler.waiting
            and not scheduler.swapped
            and scheduler.running == self._in_flight.seqs
            and self.kv.num_free_blocks >= len(scheduler.running)
        )

    def _run_ahead(self, step: SchedulerOutput, sampling: list[Sequence]) -> list[RequestOutput]:
        """Launches the decode step (inputs from the step in flight, if any), then lands the step in flight."""
        tokens = self.runner.launch_decode(step, inputs_on_device=self._in_flight is not None)
        self.scheduler.update(step)
        flight = _InFlight(sampling, [seq.num_tokens for seq in sampling], tokens)
        for seq in sampling:
            seq.token_ids.append(PENDING_TOKEN)
        outputs = self._land() if self._in_flight is not None else []
        self._in_flight = flight
        return outputs

    def _land(self) -> list[RequestOutput]:
        """Takes the in-flight step's tokens as a regular step takes its samples. Tokens behind them (the next step's
        pending ones) are set aside meanwhile, and dropped for a sequence that stops."""
        flight, self._in_flight = self._in_flight, None
        seqs, tokens, later = [], [], {}
        for seq, position, token in zip(flight.seqs, flight.positions, flight.tokens(), strict=True):
            if seq.finished:  # stopped or aborted while its step was in flight
                continue
            later[seq] = seq.token_ids[position + 1 :]
            del seq.token_ids[position:]
            seqs.append(seq)
            tokens.append(token)
        outputs = self._take_samples(seqs, tokens, [None] * len(seqs))
        for seq, pending in later.items():
            if not seq.finished:
                seq.token_ids += pending
        return outputs

    def _fork_new_completions(self, sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """A request with n > 1 samples its first tokens from one prompt pass: its sequence is forked into n that
        share the prompt's blocks. Returns the sequences to sample and the logits row each one reads."""
        seqs, rows = [], []
        for row, seq in enumerate(sampling):
            seqs.append(seq)
            rows.append(row)
            request = seq.request
            while request.pending_forks:
                child = seq.fork(len(request.seqs))
                self.kv.fork(seq, child)
                self.scheduler.add_running(child)
                request.seqs.append(child)
                seqs.append(child)
                rows.append(row)
        return seqs, rows

    def _early_stop_ids(self, seq: Sequence) -> set[int]:
        """Token ids min_tokens keeps from being sampled: EOS (unless ignored) and stop token ids."""
        params = seq.request.params
        if len(seq.token_ids) - seq.prompt_len >= params.min_tokens:
            return set()
        ids = set(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def _append(self, seq: Sequence, token: int, logprobs: list[tuple[int, float, int]] | None) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        if params.structured_outputs is not None:
            self._grammar(seq).accept_token(token)
        if logprobs is not None:
            seq.logprobs.append({t: Logprob(lp, rank, self.tokenizer.decode([t])) for t, lp, rank in logprobs})
            seq.cumulative_logprob += logprobs[0][1]
        num_output = len(seq.token_ids) - seq.prompt_len
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            delta = seq.detokenizer.step(token)
            seq.text += delta
            if delta and params.stop_strings and num_output >= params.min_tokens:
                self._check_stop_strings(seq, len(delta))
        if seq.finish_reason is None and (
            num_output == params.max_tokens or len(seq.token_ids) >= self.config.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if not isinstance(seq.stop_reason, str):  # a stop string cut the text; anything else ends it whole
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, delta_len: int) -> None:
        """Ends seq at the earliest stop string the new text completed; the stop string is cut from the output."""
        found = None
        for stop in seq.request.params.stop_strings:
            index = seq.text.find(stop, max(0, len(seq.text) - delta_len - len(stop) + 1))
            if index != -1 and (found is None or index < found[0]):
                found = (index, stop)
        if found is not None:
            seq.text = seq.text[: found[0]]
            seq.finish_reason, seq.stop_reason = "stop", found[1]

    def stats(self) -> EngineStats:
        kv = self.kv.stats(self.scheduler.running)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.swapped),
            kv_cache_usage=kv.usage,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_free=kv.free_blocks,
            kv_waste_slots=kv.waste_slots,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=self.kv.prefix_queries,
            prefix_cache_hits_total=self.kv.prefix_hits,
        )


@dataclass
class _InFlight:
    seqs: list[Sequence]  # in the order of the step's rows
    positions: list[int]  # where each sequence's pending token sits in its token_ids
    tokens: Callable[[], list[int]]  # waits for the step and returns its tokens


def _request_ids(seqs) -> list[str]:
    return list(dict.fromkeys(seq.request.request_id for seq in seqs))


def _runs_ahead(params: SamplingParams) -> bool:
    """The graph's own argmax is the whole sampling, and no fork will want the row."""
    return params.argmax_only and params.n == 1


def _eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
