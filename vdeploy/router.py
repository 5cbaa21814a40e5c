"""The router: one stable address (the recipe's `server.port`) in front of the ready replicas of the serving revision.

It is an ASGI app served by uvicorn inside the supervisor's event loop. Starlette + uvicorn rather than a hand-written
HTTP/1.1 proxy on asyncio streams: request parsing, keep-alive, chunked bodies and back-pressure are exactly the parts
a home-made proxy gets wrong, and both libraries are small and torch-free. httpx talks to the replicas and lets a
response be relayed chunk by chunk, so server-sent events stream through unchanged.

Each request goes to the replica with the fewest outstanding requests (ties: the first). Until the first byte of
a reply reaches the client, a request is not lost: a replica that refuses the connection, drops it (killed
mid-request) or answers 503 (its engine died) is skipped and the request goes to the next one; with none left it is
held, up to HOLD_S, until a replica is ready again (the only one restarting). So clients see neither a rollout nor a
crash, except a stream cut after it began. Every error the router itself answers is OpenAI's error JSON. A client
that leaves before its answer comes has its request to the replica cancelled, which aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger("vdeploy.router")

HOLD_S = 30.0  # how long a request waits for a ready replica before the router answers 503
RETRY_PAUSE_S = 0.1  # between rounds over the replicas while holding a request

# Headers that describe one hop, not the message (RFC 9110 7.6.1); httpx and uvicorn set their own.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}


class Backend:
    """One replica as the router sees it."""

    def __init__(self, url: str, revision: int, replica: int = 0):
        self.url = url
        self.revision = revision
        self.replica = replica
        self.outstanding = 0  # requests sent and not yet fully answered

    def __repr__(self) -> str:
        return f"Backend({self.url}, rev {self.revision}, {self.outstanding} outstanding)"


def error_response(status: int, message: str) -> JSONResponse:
    """OpenAI's error JSON, as the replicas answer it, so a client sees one error format whoever answered."""
    kind = {502: "BadGatewayError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


class Router:
    def __init__(self, hold_s: float = HOLD_S) -> None:
        self.hold_s = hold_s
        self.backends: list[Backend] = []
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),  # generations may take minutes; connecting may not
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def set_backends(self, backends: list[Backend]) -> None:
        """Route new requests to `backends` only; requests in flight elsewhere finish where they are."""
        self.backends = list(backends)

    def pick(self, exclude: set[int]) -> Backend | None:
        candidates = [b for b in self.backends if id(b) not in exclude]
        return min(candidates, key=lambda b: b.outstanding, default=None)

    async def drain(self, backend: Backend, timeout: float) -> bool:
        """Wait until `backend` (already removed from the routing set) has no request in flight."""
        deadline = time.monotonic() + timeout
        while backend.outstanding and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return backend.outstanding == 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            body = await request.body()  # read once, so that the request can be sent again to another replica
            response = await _unless_client_leaves(self.forward(request, body), receive)
        except Exception as e:  # a bug of ours, or the client gone: still an answer in the API's format
            log.exception("routing failed")
            response = error_response(502, f"the router could not relay the request: {e!r}")
        if response is not None:
            await response(scope, receive, send)

    async def forward(self, request: Request, body: bytes) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        deadline = time.monotonic() + self.hold_s
        tried: set[int] = set()
        problem = "no replica is ready"
        while True:
            backend = self.pick(tried)
            if backend is None:  # every replica tried: hold the request while one may come back
                if time.monotonic() >= deadline:
                    return error_response(503, f"no ready replica to serve the request ({problem})")
                await asyncio.sleep(RETRY_PAUSE_S)
                tried.clear()
                continue
            tried.add(id(backend))
            upstream = self.client.build_request(
                request.method, backend.url + request.url.path, params=request.url.query, headers=headers, content=body
            )
            backend.outstanding += 1
            try:
                reply, chunks, first = await self._first_chunk(upstream)
            except httpx.TransportError as e:
                # Refused, or dropped before the first byte: nothing reached the client. Try another replica.
                backend.outstanding -= 1
                problem = f"replica {backend.replica}: {e!r}"
                log.warning("replica %s failed before answering (%r); retrying elsewhere", backend.url, e)
                continue
            except BaseException:
                backend.outstanding -= 1
                raise
            if reply.status_code == 503:  # the replica's engine is gone; another may serve it
                await reply.aclose()
                backend.outstanding -= 1
                problem = f"replica {backend.replica} answered 503"
                continue
            reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_HEADERS}
            reply_headers["x-vdeploy-revision"] = str(backend.revision)
            reply_headers["x-vdeploy-replica"] = str(backend.replica)
            relay = self._relay(reply, chunks, first, backend)
            return StreamingResponse(relay, status_code=reply.status_code, headers=reply_headers)

    async def _first_chunk(self, upstream: httpx.Request) -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
        """The reply, its body, and the body's first chunk (a stream's first event): until that has come, the
        request can be sent elsewhere."""
        reply = await self.client.send(upstream, stream=True)
        chunks = reply.aiter_raw()
        try:
            first = await anext(chunks, b"")
        except BaseException:
            await reply.aclose()
            raise
        return reply, chunks, first

    async def _relay(
        self, reply: httpx.Response, chunks: AsyncIterator[bytes], first: bytes, backend: Backend
    ) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.TransportError as e:  # the replica died mid-reply: the client's connection is cut, not lied to
            log.warning("replica %s failed mid-reply (%r)", backend.url, e)
            raise
        finally:
            await reply.aclose()
            backend.outstanding -= 1

    async def aclose(self) -> None:
        await self.client.aclose()


async def _unless_client_leaves(forwarding: Awaitable[Response], receive) -> Response | None:
    """The reply `forwarding` gets, or None when the client disconnects first. Then the forwarding is cancelled,
    which closes the connection to the replica: its server aborts the request and frees its KV blocks. (Once the
    reply streams, the streaming response itself watches for the disconnect.)"""
    forward = asyncio.ensure_future(forwarding)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        forward.cancel()
        raise
    finally:
        gone.cancel()
    if forward.done():
        return forward.result()
    forward.cancel()  # the client left first
    await asyncio.wait({forward})  # until the cancellation has closed the replica's connection
    return None


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the request body is already read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class PortInUse(Exception):
    pass


def bind(host: str, port: int) -> socket.socket:
    """The router's listening socket, bound before anything starts, so "port in use" is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port} (server.port): {e.strerror}") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the supervisor owns SIGTERM and stops the router itself."""

    @contextmanager
    def capture_signals(self):
        yield


async def serve(router: Router, sock: socket.socket) -> _Server:
    """Start serving `router` on `sock` in the running loop; `server.should_exit = True` stops it."""
    # The replica's own Date and Server headers pass through; uvicorn must not add a second pair.
    config = uvicorn.Config(
        router,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,
        server_header=False,
        date_header=False,
    )
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises the startup error
            raise RuntimeError("the router stopped during start-up")
        await asyncio.sleep(0.01)
    server.task = task
    return server
