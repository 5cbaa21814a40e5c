"""The router loses no request that a replica failed before answering: it retries on another replica, or holds the
request while none is ready; and every error it answers itself is OpenAI's error JSON. Real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vdeploy.router import Backend, Router, bind, serve
from vdeploy.supervisor import free_port


def _app(name: str, status: int = 200) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"replica": name, "body": (await request.body()).decode()}, status_code=status)

    return Starlette(routes=[Route("/v1/completions", echo, methods=["POST"])])


async def _serve(app) -> tuple[object, str]:
    port = free_port()
    return await serve(app, bind("127.0.0.1", port)), f"http://127.0.0.1:{port}"


async def _hang_up_server() -> tuple[asyncio.Server, str]:
    """A replica killed mid-request: it takes the connection, reads the request and closes without a byte."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _is_openai_error(reply: httpx.Response, status: int) -> bool:
    error = reply.json()["error"]
    return (
        reply.status_code == status and set(error) == {"message", "type", "param", "code"} and error["code"] == status
    )


def test_a_replica_that_drops_or_refuses_the_request_is_retried_elsewhere() -> None:
    async def scenario() -> None:
        healthy, healthy_url = await _serve(_app("healthy"))
        dying, dying_url = await _hang_up_server()
        engine_dead, dead_url = await _serve(_app("dead engine", status=503))
        router = Router(hold_s=1.0)
        backends = [Backend(dying_url, 1, 0), Backend(dead_url, 1, 1), Backend(f"http://127.0.0.1:{free_port()}", 1, 2)]
        router.set_backends([*backends, Backend(healthy_url, 1, 3)])
        front, url = await _serve(router)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", content=f"r{i}") for i in range(12)))
        assert [r.json()["replica"] for r in replies] == ["healthy"] * 12
        assert sorted(r.json()["body"] for r in replies) == sorted(f"r{i}" for i in range(12))
        assert all(b.outstanding == 0 for b in router.backends)
        front.should_exit = True
        healthy.should_exit = True
        engine_dead.should_exit = True
        await asyncio.gather(front.task, healthy.task, engine_dead.task)
        dying.close()
        await router.aclose()

    asyncio.run(scenario())


def test_a_request_is_held_while_no_replica_is_ready_then_served() -> None:
    async def scenario() -> None:
        router = Router(hold_s=10.0)
        front, url = await _serve(router)
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            started = time.monotonic()
            held = asyncio.create_task(client.post("/v1/completions", content="held"))
            await asyncio.sleep(1.0)  # the only replica is restarting
            assert not held.done()
            replica, replica_url = await _serve(_app("back"))
            router.set_backends([Backend(replica_url, 1)])
            reply = await held
            assert reply.status_code == 200 and reply.json() == {"replica": "back", "body": "held"}
            assert 1.0 <= time.monotonic() - started < 5.0
        front.should_exit = replica.should_exit = True
        await asyncio.gather(front.task, replica.task)
        await router.aclose()

    asyncio.run(scenario())


def test_a_client_that_leaves_before_the_answer_ends_the_replicas_request() -> None:
    """The router closes its connection to the replica, whose server then aborts the request. Without it, requests
    whose clients gave up stayed queued in the engines (bench/soak.py found ~450 per replica after an overload)."""

    async def scenario() -> None:
        waited: list[float] = []

        async def slow(request: Request) -> JSONResponse:  # a replica with a long queue: answers after 30 s
            started = time.monotonic()
            while not await request.is_disconnected() and time.monotonic() - started < 30:
                await asyncio.sleep(0.05)
            waited.append(time.monotonic() - started)
            return JSONResponse({})

        replica, replica_url = await _serve(Starlette(routes=[Route("/v1/completions", slow, methods=["POST"])]))
        router = Router()
        router.set_backends([backend := Backend(replica_url, 1)])
        front, url = await _serve(router)
        async with httpx.AsyncClient(base_url=url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", content="x", timeout=0.5)
        deadline = time.monotonic() + 20
        while not waited and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert waited and waited[0] < 5  # the replica saw its client, the router, leave
        assert backend.outstanding == 0
        front.should_exit = replica.should_exit = True
        await asyncio.gather(front.task, replica.task)
        await router.aclose()

    asyncio.run(scenario())


def test_router_errors_are_openai_json() -> None:
    async def scenario() -> None:
        dying, dying_url = await _hang_up_server()
        router = Router(hold_s=0.3)
        router.set_backends([Backend(dying_url, 1)])
        front, url = await _serve(router)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            reply = await client.post("/v1/completions", content="x")
            assert _is_openai_error(reply, 503), reply.text
            assert "RemoteProtocolError" in reply.json()["error"]["message"]  # says what went wrong last
            router.set_backends([])
            assert _is_openai_error(await client.get("/v1/models"), 503)
        front.should_exit = True
        await front.task
        dying.close()
        await router.aclose()

    asyncio.run(scenario())
