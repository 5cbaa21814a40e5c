"""Generation routes: /v1/completions and /v1/chat/completions, answered whole or streamed as server-sent events.

Each prompt is one engine request; `n` choices per prompt come from the engine's parallel sampling. The engine yields
cumulative outputs, so a stream sends each choice's new text (and new tokens' logprobs) since the last event.
A request whose client goes away is aborted, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from vdeploy_engine.outputs import CompletionOutput, Logprob, RequestOutput
from vdeploy_engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from vdeploy_engine.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobContent,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingRequest,
    UsageInfo,
    random_id,
)
from vdeploy_engine.server.state import APIError, ServerState, error_body, server_state
from vdeploy_engine.server.tools import ToolCallStream, tool_mode

router = APIRouter()
# With `stream: true` the answer is server-sent events (documented in /openapi.json next to the JSON body).
_STREAMED: dict[int | str, dict] = {200: {"content": {"text/event-stream": {}}}}
logger = logging.getLogger("vdeploy_engine.server")

_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "seed",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
)


@router.post("/v1/completions", response_model=None, responses=_STREAMED)
async def create_completion(
    body: CompletionRequest, raw: Request, state: ServerState = Depends(server_state)
) -> CompletionResponse | Response:
    state.check_model(body.model)
    state.require_runner("generate", "Completions")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported.", "echo")
    request_id = random_id("cmpl")
    constraint = _constraint(body)
    jobs = [
        _Job.create(state, f"{request_id}-{i}", ids, body, body.max_tokens, body.logprobs, "prompt", constraint)
        for i, ids in enumerate(_completion_prompts(state, body.prompt))
    ]
    prefixes = [state.tokenizer.decode(job.prompt_ids) if body.echo else "" for job in jobs]
    text_offsets: dict[int, int] = {}  # per choice: characters before its next token, for logprobs

    def choice(job_index: int, delta: _Delta) -> CompletionChoice:
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(state, delta, body.logprobs, text_offsets.get(delta.index, 0))
            text_offsets[delta.index] = text_offsets.get(delta.index, 0) + len(delta.text)
        text = prefixes[job_index] + delta.text if delta.first else delta.text
        return CompletionChoice(index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason)

    if body.stream:
        envelope = CompletionResponse(id=request_id, model=state.model_name, choices=[])
        return _sse(_stream(jobs, body.n, choice, envelope, _include_usage(body)))
    finals = await _until_disconnected(raw, _final_outputs(jobs))
    if finals is None:
        return Response(status_code=499)
    choices = [choice(i, _Delta.whole(i, o, body.n)) for i, final in enumerate(finals) for o in final.outputs]
    return CompletionResponse(id=request_id, model=state.model_name, choices=choices, usage=_usage(jobs, finals))


@router.post("/v1/chat/completions", response_model=None, responses=_STREAMED)
async def create_chat_completion(
    body: ChatCompletionRequest, raw: Request, state: ServerState = Depends(server_state)
) -> ChatCompletionResponse | Response:
    state.check_model(body.model)
    state.require_runner("generate", "Chat Completions")
    request_id = random_id("chatcmpl")
    try:
        mode = tool_mode(body, state.config.enable_auto_tool_choice, state.config.tool_call_parser)
    except ValueError as error:
        raise APIError(400, str(error), "tool_choice") from error
    constraint = _constraint(body)
    if mode.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {mode.kind!r} cannot be combined with another constraint.", "tool_choice")
        constraint = mode.constraint
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    prompt_ids = await state.chat_prompt(body.messages, body.add_generation_prompt, body.chat_template_kwargs, tools)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    keep_special = mode.parser is not None and mode.parser.keeps_special_tokens
    job = _Job.create(
        state, request_id, prompt_ids, body, max_tokens, top_logprobs, "messages", constraint, keep_special
    )

    def logprobs(delta: _Delta) -> ChatLogprobs | None:
        return None if top_logprobs is None else _chat_logprobs(state, delta, top_logprobs)

    if body.stream:
        created = int(time.time())
        calls = [ToolCallStream(mode) for _ in range(body.n)]

        def choice(_: int, delta: _Delta) -> ChatStreamChoice | None:
            content, tool_calls, finish_reason = calls[delta.index].delta(delta.text, delta.finish_reason)
            if not (delta.first or content or tool_calls or finish_reason or top_logprobs is not None):
                return None  # text held back until the parser knows whether it is content
            message = DeltaMessage(
                role="assistant" if delta.first else None, content=content or "", tool_calls=tool_calls
            )
            return ChatStreamChoice(
                index=delta.index, delta=message, logprobs=logprobs(delta), finish_reason=finish_reason
            )

        envelope = ChatCompletionChunk(id=request_id, created=created, model=state.model_name, choices=[])
        return _sse(_stream([job], body.n, choice, envelope, _include_usage(body)))
    finals = await _until_disconnected(raw, _final_outputs([job]))
    if finals is None:
        return Response(status_code=499)
    choices = []
    for o in finals[0].outputs:
        content, tool_calls = mode.calls(o.text)
        choices.append(
            ChatChoice(
                index=o.index,
                message=ChatResponseMessage(content=content, tool_calls=tool_calls),
                logprobs=logprobs(_Delta.whole(0, o, body.n)),
                finish_reason=mode.finish_reason(tool_calls, o.finish_reason),
            )
        )
    return ChatCompletionResponse(id=request_id, model=state.model_name, choices=choices, usage=_usage([job], finals))


# ---------------------------------------------------------------------------------------------------- engine requests


@dataclass
class _Job:
    """One engine request: a prompt, its sampling parameters, and its metrics; aborted if not run to the end."""

    state: ServerState
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams

    @classmethod
    def create(
        cls,
        state: ServerState,
        request_id: str,
        prompt_ids: list[int],
        body: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
        constraint: StructuredOutputs | None = None,
        keep_special_tokens: bool = False,
    ) -> _Job:
        values = {name: getattr(body, name) for name in _SAMPLING_FIELDS if getattr(body, name) is not None}
        if keep_special_tokens:
            values["skip_special_tokens"] = False
        max_tokens = state.resolve_max_tokens(len(prompt_ids), max_tokens, prompt_param)
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured_outputs=constraint, **values)
            state.engine.check_params(params)  # what the model bounds: token ids within its vocabulary
        except SamplingParamsError as error:
            raise APIError(400, str(error), error.field) from error
        return cls(state, request_id, prompt_ids, params)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The engine's outputs; closing this early (client gone) closes the engine's stream, which aborts the
        request and frees its KV blocks."""
        timer = self.state.metrics.request_timer()
        generated, finished = 0, False
        try:
            async with contextlib.aclosing(
                self.state.engine.generate(self.prompt_ids, self.params, self.request_id)
            ) as outputs:
                async for output in outputs:
                    total = sum(len(o.token_ids) for o in output.outputs)
                    timer.tokens(total - generated)
                    generated = total
                    if output.finished:
                        finished = True
                        timer.finished(output.outputs[0].finish_reason or "stop")
                    yield output
        finally:
            if not finished:
                timer.finished("abort")


async def _final_outputs(jobs: list[_Job]) -> list[RequestOutput]:
    async def last(job: _Job) -> RequestOutput:
        final = None
        async for output in job.outputs():
            final = output
        return final

    return await asyncio.gather(*(last(job) for job in jobs))


async def _until_disconnected(raw: Request, work: Awaitable[list[RequestOutput]]) -> list[RequestOutput] | None:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client disconnects; None then."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await raw.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


async def _merged(jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(job index, output) from all jobs as they arrive; closing this closes (and so aborts) every job."""
    if len(jobs) == 1:
        async with contextlib.aclosing(jobs[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: _Job) -> None:
        try:
            async for output in job.outputs():
                await queue.put((index, output))
        except Exception as error:  # handed to the consumer, which raises it
            await queue.put((index, error))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------- streaming


@dataclass
class _Delta:
    """What one choice gained since the last event: new text, new tokens (with their logprobs), maybe its end."""

    index: int  # the choice index in the response
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    first: bool  # the choice's first event (chat sends the role, echo the prompt)

    @classmethod
    def whole(cls, job_index: int, output: CompletionOutput, n: int) -> _Delta:
        return cls(
            job_index * n + output.index,
            output.text,
            output.token_ids,
            output.logprobs,
            output.finish_reason,
            first=True,
        )


@dataclass
class _Progress:
    """How much of each choice a stream has sent."""

    text: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def delta(self, index: int, output: CompletionOutput) -> _Delta | None:
        first = index not in self.text
        sent_text, sent_tokens = self.text.get(index, 0), self.tokens.get(index, 0)
        if not first and len(output.text) == sent_text and output.finish_reason is None:
            return None  # nothing new to say (tokens held back until their text is complete)
        self.text[index], self.tokens[index] = len(output.text), len(output.token_ids)
        new_logprobs = output.logprobs[sent_tokens:] if output.logprobs is not None else None
        return _Delta(
            index,
            output.text[sent_text:],
            output.token_ids[sent_tokens:],
            new_logprobs,
            output.finish_reason,
            first,
        )


async def _stream(
    jobs: list[_Job],
    n: int,
    make_choice: Callable[[int, _Delta], BaseModel | None],
    envelope: CompletionResponse | ChatCompletionChunk,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events: one chunk per choice that gained text (unless make_choice holds it back: None), then the usage
    chunk if asked for, then [DONE]. Every chunk is `envelope` (id, model, created: the same for the whole stream) around its choices, so the envelope is
    serialised once and each event serialises only its choice."""
    head, _, tail = _event(envelope).partition('"choices":[]')
    head, tail = head + '"choices":[', "]" + tail
    progress, finals = _Progress(), [None] * len(jobs)
    try:
        async with contextlib.aclosing(_merged(jobs)) as outputs:
            async for job_index, output in outputs:
                finals[job_index] = output
                for completion in output.outputs:
                    delta = progress.delta(job_index * n + completion.index, completion)
                    choice = None if delta is None else make_choice(job_index, delta)
                    if choice is not None:
                        yield head + choice.model_dump_json(exclude_none=True) + tail
        if include_usage:
            yield _event(envelope.model_copy(update={"usage": _usage(jobs, finals)}))
    except ValueError as error:  # the engine refused the request after the stream began
        yield f"data: {error_body(400, str(error)).model_dump_json()}\n\n"
    except Exception as error:  # the request failed in the engine: its client hears why, in the stream it reads
        logger.error("streamed request failed", exc_info=error)
        yield f"data: {error_body(500, f'{type(error).__name__}: {error}').model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _include_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# ---------------------------------------------------------------------------------------------------- helpers


def _constraint(body: SamplingRequest) -> StructuredOutputs | None:
    try:
        return body.constraint()
    except SamplingParamsError as error:
        raise APIError(400, str(error), error.field) from error


def _completion_prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.tokenize(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", "prompt")
    if isinstance(prompt[0], int):
        prompts = [list(prompt)]
    elif isinstance(prompt[0], str):
        return [state.tokenize(text) for text in prompt]
    else:
        prompts = [list(ids) for ids in prompt]
    for ids in prompts:
        state.check_token_ids(ids, "prompt")
    return prompts


def _usage(jobs: list[_Job], finals: list[RequestOutput | None]) -> UsageInfo:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    completion_tokens = sum(len(o.token_ids) for final in finals if final is not None for o in final.outputs)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _token_text(state: ServerState, token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return state.tokenizer.decode([token_id])


def _top(state: ServerState, candidates: dict[int, Logprob], count: int) -> list[tuple[str, float]]:
    ranked = sorted(candidates.items(), key=lambda item: item[1].rank)[:count]
    return [(_token_text(state, token_id, lp), lp.logprob) for token_id, lp in ranked]


def _completion_logprobs(state: ServerState, delta: _Delta, count: int, text_offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for token_id, candidates in zip(delta.token_ids, delta.logprobs or [], strict=False):
        sampled = candidates.get(token_id)
        token = _token_text(state, token_id, sampled)
        result.tokens.append(token)
        result.token_logprobs.append(sampled.logprob if sampled is not None else None)
        result.top_logprobs.append(dict(_top(state, candidates, count)) if count else None)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _chat_logprobs(state: ServerState, delta: _Delta, count: int) -> ChatLogprobs:
    content = []
    for token_id, candidates in zip(delta.token_ids, delta.logprobs or [], strict=False):
        sampled = candidates.get(token_id)
        token = _token_text(state, token_id, sampled)
        top = [ChatLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in _top(state, candidates, count)]
        logprob = sampled.logprob if sampled is not None else float("-inf")
        content.append(ChatLogprobContent(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)
