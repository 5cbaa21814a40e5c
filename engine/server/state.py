"""What every route shares: the replica's state (engine, tokenizer, metrics) and the checks and errors common to all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.server.metrics import ServerMetrics
from vdeploy_engine.server.protocol import ChatMessage, ErrorInfo, ErrorResponse

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

    def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict | None = None
    ) -> list[int]:
        """Token ids of `messages` rendered through the model's chat template (or the configured one)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "The model has no chat template; start the server with --chat-template.", "messages")
        try:
            rendered = self.tokenizer.apply_chat_template(
                [m.model_dump(exclude_none=True) | {"content": m.text()} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except Exception as error:  # the template rejects the conversation (jinja raise_exception, bad roles ...)
            raise APIError(400, f"The chat template could not render the messages: {error}", "messages") from error
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving `request` (async, as every dependency here: FastAPI runs a
    plain `def` dependency on its thread pool, a round trip per request that delayed a burst of 64 by about 0.1 s)."""
    return request.app.state.server
