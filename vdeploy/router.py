"""The router: one stable address (the recipe's `server.port`) in front of the ready replicas of the serving revision.

It is an ASGI app served by uvicorn inside the supervisor's event loop. Starlette + uvicorn rather than a hand-written
HTTP/1.1 proxy on asyncio streams: request parsing, keep-alive, chunked bodies and back-pressure are exactly the parts
a home-made proxy gets wrong, and both libraries are small and torch-free. httpx talks to the replicas and lets a
response be relayed chunk by chunk, so server-sent events stream through unchanged.

Each request goes to the replica with the fewest outstanding requests (ties: the first). A replica that refuses the
connection (it was just stopped, or crashed) is skipped and the request is sent to the next one, so clients do not
see a rollout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger("vdeploy.router")

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


class Router:
    def __init__(self) -> None:
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
        response = await self.forward(Request(scope, receive))
        await response(scope, receive, send)

    async def forward(self, request: Request) -> Response:
        body = await request.body()  # read once, so a refused connection can be retried on another replica
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        tried: set[int] = set()
        while (backend := self.pick(tried)) is not None:
            tried.add(id(backend))
            backend.outstanding += 1
            upstream = self.client.build_request(
                request.method,
                backend.url + request.url.path,
                params=request.url.query,
                headers=headers,
                content=body,
            )
            try:
                reply = await self.client.send(upstream, stream=True)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                # Refused or closed before any response: the replica is gone, nothing was answered. Try another.
                backend.outstanding -= 1
                log.warning("replica %s unavailable (%s); retrying elsewhere", backend.url, e)
                continue
            except BaseException:
                backend.outstanding -= 1
                raise
            reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_HEADERS}
            reply_headers["x-vdeploy-revision"] = str(backend.revision)
            reply_headers["x-vdeploy-replica"] = str(backend.replica)
            return StreamingResponse(self._relay(reply, backend), status_code=reply.status_code, headers=reply_headers)
        return JSONResponse(
            {"error": {"message": "no ready replica to serve the request", "type": "ServiceUnavailable", "code": 503}},
            status_code=503,
        )

    async def _relay(self, reply: httpx.Response, backend: Backend) -> AsyncIterator[bytes]:
        try:
            async for chunk in reply.aiter_raw():
                yield chunk
        finally:
            await reply.aclose()
            backend.outstanding -= 1

    async def aclose(self) -> None:
        await self.client.aclose()


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
