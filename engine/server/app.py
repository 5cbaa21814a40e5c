"""The HTTP face of one engine replica: vLLM's OpenAI-compatible routes over an AsyncEngine or a PoolingEngine.

Every failure a client can cause answers OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`);
routes other than health, version, metrics and the docs require the API key when one is set.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vdeploy_engine.async_engine import EngineDeadError
from vdeploy_engine.config import EngineConfig
from vdeploy_engine.server import completions, embeddings
from vdeploy_engine.server.metrics import CONTENT_TYPE, ServerMetrics
from vdeploy_engine.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from vdeploy_engine.server.state import APIError, ServerState, error_response, server_state

logger = logging.getLogger("vdeploy_engine.server")


async def _check_api_key(request: Request) -> None:
    expected = (await server_state(request)).api_key
    if expected is None:
        return
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(supplied.encode(), expected.encode()):
        raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", "authorization")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as (message, param), in OpenAI's wording where it has one."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return f"Malformed JSON body: {reason} (character {first['loc'][-1]}).", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not location:
        return "The request body must be a JSON object.", None
    field = ".".join(location)
    return f"Invalid value for '{field}': {first.get('msg')}", location[0]


utility = APIRouter()


@utility.get("/v1/models")
async def list_models(state: ServerState = Depends(server_state)) -> ModelList:
    card = ModelCard(id=state.model_name, root=state.config.model, max_model_len=state.max_model_len)
    return ModelList(data=[card])


@utility.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: ServerState = Depends(server_state)) -> TokenizeResponse:
    state.check_model(body.model)
    if body.messages is not None:
        tokens = await state.chat_prompt(body.messages, body.add_generation_prompt)
    else:
        tokens = state.tokenize(body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@utility.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: ServerState = Depends(server_state)) -> DetokenizeResponse:
    state.check_model(body.model)
    state.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


def build_app(config: EngineConfig, engine: Any, api_key: str | None = None) -> FastAPI:
    """The replica's app over a loaded, running `engine` (stopped when the app stops)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="vdeploy engine", version=_version(), lifespan=lifespan)
    measured = getattr(engine, "measured_memory", {})  # the pooling engine measures nothing yet
    metrics = ServerMetrics(config.name, engine.stats, config.predicted_memory, measured)
    app.state.server = ServerState(config, engine, metrics, api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(ValueError)
    async def _refused_by_engine(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, str(exc))  # the engine's way of refusing a request, as in vLLM

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        if isinstance(exc, EngineDeadError):  # the process is on its way out; the supervisor restarts it
            return error_response(503, f"The engine stopped: {exc.__cause__!r}; the replica is restarting.")
        return error_response(500, f"Internal server error: {type(exc).__name__}: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health", response_class=Response, responses={200: {"description": "Ready"}, 503: {"description": "Down"}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running() else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(app.state.server.metrics.render(), media_type=CONTENT_TYPE)

    for router in (utility, completions.router, embeddings.router):
        app.include_router(router, dependencies=[Depends(_check_api_key)], responses=_ERROR_RESPONSES)
    return app


# Every error an API route may answer, documented in /openapi.json with its body (clients and schema conformance
# checks then know each answer the server gives).
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "The request is invalid: the message and `param` say what to change."),
        (401, "The API key is missing or wrong."),
        (404, "No model by that name."),
        (500, "Serving this request failed; other requests are not concerned."),
        (503, "The engine stopped; the replica is restarting."),
    )
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vdeploy")
    except PackageNotFoundError:
        return "unknown"
