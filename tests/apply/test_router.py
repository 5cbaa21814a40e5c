"""The router against real HTTP servers on loopback (small Starlette apps standing in for replicas)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from vdeploy.router import Backend, PortInUse, Router, bind, serve
from vdeploy.supervisor import free_port


def _replica_app(name: str, release: asyncio.Event | None = None, gates: list[asyncio.Event] = ()) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        if release is not None:
            await release.wait()
        return JSONResponse({"replica": name, "body": (await request.body()).decode(), "query": request.url.query})

    async def stream(request: Request) -> StreamingResponse:
        async def events():
            for i, gate in enumerate(gates):
                yield f"data: {i}\n\n".encode()
                await gate.wait()  # the next event only once the client has this one
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)])


async def _start(app) -> tuple[object, int]:
    port = free_port()
    return await serve(app, bind("127.0.0.1", port)), port


async def _stop(*servers) -> None:
    for server in servers:
        server.should_exit = True
        await server.task


def test_pick_prefers_fewest_outstanding() -> None:
    router = Router()
    a, b = Backend("http://a", 1), Backend("http://b", 1)
    router.set_backends([a, b])
    a.outstanding = 2
    assert router.pick(set()) is b
    b.outstanding = 3
    assert router.pick(set()) is a
    assert router.pick({id(a), id(b)}) is None


def test_proxies_body_query_and_revision_and_balances_load() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        slow, slow_port = await _start(_replica_app("slow", release))
        fast, fast_port = await _start(_replica_app("fast"))
        router = Router()
        router.set_backends([Backend(f"http://127.0.0.1:{slow_port}", 1), Backend(f"http://127.0.0.1:{fast_port}", 1)])
        front, port = await _start(router)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            held = asyncio.create_task(client.post("/echo?x=1", content="first"))
            await asyncio.sleep(0.3)  # the first request is outstanding on "slow"
            second = await client.post("/echo?y=2", content="second")
            assert second.json() == {"replica": "fast", "body": "second", "query": "y=2"}
            assert second.headers["x-vdeploy-revision"] == "1"
            release.set()
            assert (await held).json()["replica"] == "slow"
        await _stop(front, slow, fast)
        await router.aclose()

    asyncio.run(scenario())


def test_server_sent_events_stream_through_unbuffered() -> None:
    """The replica sends each event only after the client has received the one before: a router that held events
    back until the response ended would never deliver the first (no timing involved but the 10 s give-up)."""

    async def scenario() -> None:
        gates = [asyncio.Event() for _ in range(3)]
        replica, replica_port = await _start(_replica_app("r", gates=gates))
        router = Router()
        router.set_backends([Backend(f"http://127.0.0.1:{replica_port}", 1)])
        front, port = await _start(router)
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("GET", f"http://127.0.0.1:{port}/stream") as reply:
                assert reply.headers["content-type"].startswith("text/event-stream")
                events = (line async for line in reply.aiter_lines() if line.startswith("data: "))
                for i, gate in enumerate(gates):
                    assert await asyncio.wait_for(anext(events), 10) == f"data: {i}"
                    gate.set()
                assert await asyncio.wait_for(anext(events), 10) == "data: [DONE]"
        await _stop(front, replica)
        await router.aclose()

    asyncio.run(scenario())


def test_refused_replica_is_skipped_and_no_replica_is_503() -> None:
    async def scenario() -> None:
        replica, replica_port = await _start(_replica_app("alive"))
        router = Router(hold_s=0.5)
        dead = Backend(f"http://127.0.0.1:{free_port()}", 1)  # nothing listens there
        router.set_backends([dead, Backend(f"http://127.0.0.1:{replica_port}", 1)])
        front, port = await _start(router)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(3):
                assert (await client.post("/echo", content="x")).json()["replica"] == "alive"
            assert dead.outstanding == 0
            router.set_backends([])
            reply = await client.post("/echo", content="x")
            assert reply.status_code == 503 and "no ready replica" in reply.json()["error"]["message"]
        await _stop(front, replica)
        await router.aclose()

    asyncio.run(scenario())


def test_port_in_use_is_a_clear_error() -> None:
    sock = bind("127.0.0.1", free_port())
    try:
        with pytest.raises(PortInUse, match=r"cannot listen on 127\.0\.0\.1:\d+ \(server\.port\)"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
