"""Chat templates a request carries: refused unless the server trusts them, and a template that loops is stopped
at the time limit (its thread interrupted), off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from vdeploy_engine.server import state as server_state
from vdeploy_engine.server.protocol import ChatMessage
from vdeploy_engine.server.state import APIError, ServerState

LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
PLAIN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
HELLO = [ChatMessage(role="user", content="Hello")]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _state(tokenizer, trusted: bool) -> ServerState:
    engine = SimpleNamespace(tokenizer=tokenizer)  # chat_prompt needs only the tokenizer
    return ServerState(config=SimpleNamespace(trust_request_chat_template=trusted), engine=engine, metrics=None)


def test_an_untrusted_request_template_is_refused(tokenizer) -> None:
    with pytest.raises(APIError, match="--trust-request-chat-template") as refused:
        asyncio.run(_state(tokenizer, False).chat_prompt(HELLO, True, {"chat_template": PLAIN}))
    assert refused.value.status == 400 and refused.value.param == "chat_template_kwargs"


def test_a_trusted_request_template_is_used(tokenizer) -> None:
    tokens = asyncio.run(_state(tokenizer, True).chat_prompt(HELLO, True, {"chat_template": PLAIN}))
    assert tokenizer.decode(tokens) == "[user] Hello\n"


def test_a_looping_template_is_stopped_at_the_time_limit(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(server_state, "CHAT_TEMPLATE_TIME_LIMIT_S", 0.5)

    async def render_while_the_loop_ticks() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        with pytest.raises(APIError, match="did not finish rendering within 0.5 s"):
            await _state(tokenizer, True).chat_prompt(HELLO, True, {"chat_template": LOOPING})
        ticker.cancel()
        return time.monotonic() - started, ticks

    seconds, ticks = asyncio.run(render_while_the_loop_ticks())
    assert seconds < 5.0 and ticks > 5  # the event loop ran meanwhile (a busy CI box: loose bounds)
    deadline = time.monotonic() + 10
    while any(t.name == "chat-template" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "chat-template" for t in threading.enumerate())  # the runaway render was stopped
