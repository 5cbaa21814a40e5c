"""What every route shares: the replica's state (engine, tokenizer, metrics) and the checks and errors common to all."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.server.metrics import ServerMetrics
from vdeploy_engine.server.protocol import ChatMessage, ErrorInfo, ErrorResponse
from vdeploy_engine.server.tools import template_messages

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request the server refuses: answered as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    info = ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "Error"), param=param, code=status)
    return ErrorResponse(error=info)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status)


# A chat template renders on a thread of its own and is stopped past this (a looping template once blocked /health
# for 14 s when it rendered on the event loop).
CHAT_TEMPLATE_TIME_LIMIT_S = 5.0


@dataclass
class ServerState:
    config: EngineConfig
    engine: Any  # engine.async_engine.AsyncEngine (runner generate) or engine.pooling.PoolingEngine (runner pooling)
    metrics: ServerMetrics
    api_key: str | None = None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name: 0 .. vocab_size - 1."""
        return getattr(self.engine, "vocab_size", None) or len(self.tokenizer)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} in '{param}' is outside the vocabulary (0..{self.vocab_size - 1}).", param)

    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")

    def require_runner(self, runner: str, api: str) -> None:
        if self.config.runner != runner:
            raise APIError(400, f"The model does not support {api} API")

    def check_prompt_length(self, prompt_tokens: int, param: str) -> None:
        """400 naming both counts when the prompt does not fit (EngineConfig.prompt_length_error's rule)."""
        problem = self.engine.config.prompt_length_error(prompt_tokens)  # the engine's: a pooling model may cap it
        if problem:
            raise APIError(400, problem[0].upper() + problem[1:] + ".", param)

    def resolve_max_tokens(self, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """max_tokens checked against the room the prompt leaves (400 naming the counts); None means all of it."""
        self.check_prompt_length(prompt_tokens, param)
        room = self.max_model_len - prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                "max_tokens",
            )
        return max_tokens

    async def chat_prompt(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of `messages` (and `tools`, for templates that show them) rendered through the model's chat
        template (or the configured one), off the event loop and within CHAT_TEMPLATE_TIME_LIMIT_S. A template of
        the request's own is refused unless trusted."""
        template_kwargs = template_kwargs or {}
        if "chat_template" in template_kwargs and not self.config.trust_request_chat_template:
            raise APIError(
                400,
                "Chat templates in requests are refused: the server was not started with --trust-request-chat-template "
                "(a recipe's server.trust_request_chat_template: true).",
                "chat_template_kwargs",
            )
        if not getattr(self.tokenizer, "chat_template", None) and "chat_template" not in template_kwargs:
            raise APIError(400, "The model has no chat template; start the server with --chat-template.", "messages")
        conversation = template_messages([m.model_dump(exclude_none=True) | {"content": m.text()} for m in messages])

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )

        try:
            rendered = await run_with_time_limit(render, CHAT_TEMPLATE_TIME_LIMIT_S)
        except TimeoutError:
            raise APIError(
                400, f"The chat template did not finish rendering within {CHAT_TEMPLATE_TIME_LIMIT_S:g} s.", "messages"
            ) from None
        except Exception as error:  # the template rejects the conversation (jinja raise_exception, bad roles ...)
            raise APIError(400, f"The chat template could not render the messages: {error}", "messages") from error
        check_text(rendered, "messages")
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        check_text(text, param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_text(text: str, param: str) -> None:
    """400 for text the tokenizer cannot take: JSON may carry lone UTF-16 surrogates ("\\ud800"), which no
    encoding holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(
            400, f"'{param}' holds text that cannot be encoded (a lone surrogate at character {error.start}).", param
        ) from None


class _Interrupted(TimeoutError):
    """Raised inside a thread that ran past its time limit."""


async def run_with_time_limit(work: Callable[[], Any], seconds: float) -> Any:
    """`work()` on a thread of its own, awaited; past `seconds` the thread is interrupted (an asynchronous
    exception, taken at its next Python bytecode: a Jinja template is Python code) and TimeoutError is raised."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as failure:  # noqa: BLE001 - handed to the awaiting request
            result, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop is gone (the server stopped): no one is waiting
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=run, name="chat-template", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), seconds)
    except TimeoutError:
        done.cancel()  # what the thread ends with is no one's concern now
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Interrupted))
        raise


async def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving `request` (async, as every dependency here: FastAPI runs a
    plain `def` dependency on its thread pool, a round trip per request that delayed a burst of 64 by about 0.1 s)."""
    return request.app.state.server
