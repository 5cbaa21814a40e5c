"""AsyncEngine: the engine behind the HTTP server. The engine loop runs on a background thread; asyncio callers submit
requests and read outputs through queues, so a model step never blocks the event loop.

    engine = AsyncEngine(config)                      # or AsyncEngine.from_engine(llm_engine)
    async for output in engine.generate(prompt, params, request_id):
        output.outputs[0].text                        # cumulative; stream the part past what was already sent
    await engine.abort(request_id)                    # stops it and frees its KV blocks
    engine.stats()                                    # EngineStats: counters for vLLM's Prometheus metrics

- `generate(prompt: str | list[int], params, request_id)` yields cumulative RequestOutputs (vLLM style): each
  `outputs[i]` has `.text`, `.token_ids`, `.finish_reason` ("stop" | "length" | "abort"), `.stop_reason`,
  `.logprobs`; the last one has `finished=True`. `output.metrics` (RequestMetrics) carries arrival, first-scheduled,
  first-token, last-token and finished times plus one timestamp per step that produced tokens: TTFT, inter-token
  latency and end-to-end latency follow. Text is held back while it could be the start of a stop string, so it only
  ever grows.
- Bad input raises before anything is queued: `InvalidPromptError` (a ValueError: empty prompt, prompt not shorter
  than max_model_len — the message names both counts —, unknown token ids), `SamplingParamsError` (ValueError, names
  the field) when params are built, `ValueError` for a duplicate request id. Map them to HTTP 400.
- A generator closed early (client disconnect) aborts its request.
- Requests reaching an idle engine in a burst start as one batch: the loop waits for the rest of the burst, briefly
  (a lone request at most MAX_ARRIVAL_GAP_S). Each step's outputs reach an event loop in one callback.
- A request whose step raised fails alone: its stream raises `RequestFailedError` (a RuntimeError naming the cause)
  and the loop goes on. A device fault (CUDA error, out of memory) or a bug outside any request's step kills the
  loop: every open and later request raises `EngineDeadError` (a RuntimeError), and `on_fatal` (if given) is called
  so the server can exit and be restarted.
- `stats()` returns the EngineStats snapshot taken after the latest step (running / waiting counts, KV cache usage,
  prompt / generation token totals, preemptions, prefix cache queries / hits).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.engine import EngineStats, InvalidPromptError, LLMEngine, RequestFailedError
from vdeploy_engine.outputs import RequestOutput
from vdeploy_engine.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineDeadError", "InvalidPromptError", "RequestFailedError"]

logger = logging.getLogger("vdeploy_engine.engine")

# Arrival coalescing at an idle engine (AsyncEngine._gather_arrivals), timed in recent steps' wall time.
ARRIVAL_GAP_STEPS = 0.25  # how long to wait for the next request of a burst ...
MAX_ARRIVAL_GAP_S = 0.05  # ... at most: a lone request starts no later than this
ARRIVAL_WINDOW_STEPS = 1.0  # a whole burst waits no longer than a late arrival would have waited for a step
STEP_TIME_SMOOTHING = 0.2  # weight of the latest step in the running step time


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the cause is chained."""


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig,
        engine: LLMEngine | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self.engine = engine or LLMEngine.from_config(config)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.vocab_size = self.engine.vocab_size
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.engine.stats()
        self._error: BaseException | None = None
        self._step_seconds = 0.0  # running average of a step's wall time (0 until one has run)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(config)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> AsyncEngine:
        return cls(engine.config, engine)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self._raise_if_dead()
        text, token_ids = self.engine.check_prompt(prompt)
        self.check_params(params)
        if params.structured_outputs is not None:  # compiled here, on a worker thread, not in the engine loop
            await asyncio.to_thread(self.engine.structured_outputs.compile, params.structured_outputs)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", (request_id, text, params, token_ids)))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if isinstance(output, (ValueError, RequestFailedError)):  # refused, or failed alone
                    raise output
                if isinstance(output, BaseException):
                    raise EngineDeadError("the engine loop stopped") from output
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def check_params(self, params: SamplingParams) -> None:
        """SamplingParamsError when `params` name what this model lacks (token ids past its vocabulary)."""
        self.engine.check_params(params)

    async def abort(self, request_id: str) -> None:
        """Stops the request (its stream ends with finish_reason "abort") and frees its KV blocks."""
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def measured_memory(self) -> dict[str, int]:
        """What start-up measured, keyed like the plan's memory table (engine/worker/memory_use.py)."""
        return self.engine.runner.measured

    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError("the engine loop stopped") from self._error

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._handle_commands(block=idle):
                    return
                if idle and self.engine.has_unfinished_requests() and not self._gather_arrivals():
                    return
                started = time.monotonic()
                try:
                    outputs = self.engine.step()
                except RequestFailedError as failure:  # those requests are aborted; the others go on
                    logger.error("requests %s failed", failure.request_ids, exc_info=failure.__cause__)
                    self._stats = self.engine.stats()
                    self._publish([(request_id, failure) for request_id in failure.request_ids])
                    continue
                if outputs:
                    self._time_step(time.monotonic() - started)
                self._stats = self.engine.stats()  # before publishing, so a finished stream sees its counts
                self._publish([(output.request_id, output) for output in outputs])
        except BaseException as error:  # noqa: BLE001 - reported to every waiting caller
            logger.critical("the engine loop stopped", exc_info=error)
            self._error = error
            if self._on_fatal is not None:
                self._on_fatal(error)
            self._publish([(request_id, error) for request_id in list(self._streams)])

    def _time_step(self, seconds: float) -> None:
        if self._step_seconds:
            seconds = self._step_seconds + STEP_TIME_SMOOTHING * (seconds - self._step_seconds)
        self._step_seconds = seconds

    def _handle_commands(self, block: bool) -> bool:
        """Applies queued adds and aborts (waiting for one when idle); False once asked to stop."""
        while True:
            try:
                command, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if not self._apply(command, arg):
                return False

    def _gather_arrivals(self) -> bool:
        """Work just reached an idle engine: keeps taking requests while they keep coming, so that a burst of clients
        starts as one batch rather than as a one-request step that the rest then wait behind (on CPU that step cost
        as much as a 64-sequence decode step). Stops at the first gap of ARRIVAL_GAP_STEPS of a step (at most
        MAX_ARRIVAL_GAP_S: all a lone request loses), after ARRIVAL_WINDOW_STEPS, or at max_num_seqs requests.
        False once asked to stop."""
        gap = min(MAX_ARRIVAL_GAP_S, ARRIVAL_GAP_STEPS * self._step_seconds)
        deadline = time.monotonic() + ARRIVAL_WINDOW_STEPS * self._step_seconds
        while len(self.engine.requests) < self.config.max_num_seqs:
            timeout = min(gap, deadline - time.monotonic())
            if timeout <= 0:
                return True
            try:
                command, arg = self._commands.get(timeout=timeout)
            except queue.Empty:
                return True
            if not self._apply(command, arg):
                return False
        return True

    def _apply(self, command: str, arg: Any) -> bool:
        if command == "stop":
            return False
        if command == "add":
            request_id, text, params, token_ids = arg
            try:
                self.engine.add_request(request_id, text, params, prompt_token_ids=token_ids)
            except ValueError as error:  # e.g. the id of a request whose abort is still queued
                self._publish([(request_id, error)])
            except Exception as error:  # this request cannot be queued; the others are not concerned
                self.engine.abort_request(request_id)
                self._publish([(request_id, RequestFailedError([request_id], error))])
        elif command == "abort":
            output = self.engine.abort_request(arg)
            self._stats = self.engine.stats()
            if output is not None:
                self._publish([(arg, output)])
        return True

    def _publish(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hands outputs (or errors) to their streams with one wake-up per event loop, not one per output: a step
        of 64 streams is one callback on the server's loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                loop, outputs = stream
                batches.setdefault(loop, []).append((outputs, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)
