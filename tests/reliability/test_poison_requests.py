"""Requests built to break a replica, each sent to a real server and followed by a normal request that must succeed.

A poison request gets a 4xx naming what is wrong (or, where the value is merely odd, a normal answer), never a 5xx,
and never leaves the engine unable to serve the next client: `/health` stays 200 throughout.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.reliability.conftest import SERVED_NAME

pytestmark = pytest.mark.slow  # one server start for the module (~10 s on a busy 2-core box)

LOOPING_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"


def completion(**fields) -> dict:
    return {"model": SERVED_NAME, "prompt": "Hello, my name is", "max_tokens": 4, **fields}


def chat(content="Hello", **fields) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


# (name, path, JSON body text, the statuses it may get). Bodies are raw JSON text: several are not what a JSON
# library writes (NaN, lone surrogates).
POISON = [
    ("seed past 64 bits", "/v1/completions", completion(seed=2**64, temperature=1), {400}),
    ("seed below -2**63", "/v1/completions", completion(seed=-(2**63) - 1, temperature=1), {400}),
    ("stop token id past the vocabulary", "/v1/completions", completion(min_tokens=2, stop_token_ids=[10**9]), {400}),
    ("negative stop token id", "/v1/chat/completions", chat(stop_token_ids=[-1]), {400}),
    ("prompt token id past the vocabulary", "/v1/completions", completion(prompt=[1, 2, 10**9]), {400}),
    ("negative prompt token id", "/v1/completions", completion(prompt=[[1, 2], [-5]]), {400}),
    ("empty prompt", "/v1/completions", completion(prompt=""), {400}),
    ("lone surrogate in a prompt", "/v1/completions", completion(prompt="hi \ud800 there"), {400}),
    ("lone surrogate in a message", "/v1/chat/completions", chat("\udfff"), {400}),
    ("lone surrogate in a content part", "/v1/chat/completions", chat([{"type": "text", "text": "a\ud83d"}]), {400}),
    ("lone surrogate to /tokenize", "/tokenize", {"prompt": "\ud800"}, {400}),
    (
        "request chat template, untrusted",
        "/v1/chat/completions",
        chat(chat_template_kwargs={"chat_template": LOOPING_TEMPLATE}),
        {400},
    ),
    ("NaN temperature", "/v1/completions", '{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}', {400}),
    (
        "infinite repetition penalty",
        "/v1/completions",
        '{"prompt": "Hi", "max_tokens": 2, "repetition_penalty": Infinity}',
        {400},
    ),
    (
        "infinite temperature",
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}',
        {400},
    ),
    ("min_tokens past max_tokens", "/v1/completions", completion(min_tokens=10, max_tokens=2), {400}),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=3), {400}),
    ("detokenize past the vocabulary", "/detokenize", {"tokens": [10**12]}, {400}),
    ("body not an object", "/v1/completions", "[1, 2, 3]", {400}),
    ("truncated JSON", "/v1/completions", '{"prompt": "Hi", "max_tokens": ', {400}),
    # Unknown keys are ignored, as at the top level (found by the OpenAPI fuzz: they reached a constructor as a 500).
    ("structured_outputs with only an unknown key", "/v1/completions", completion(structured_outputs={"x": 1}), {400}),
    (
        "structured_outputs with an unknown key beside a choice",
        "/v1/completions",
        completion(structured_outputs={"choice": ["yes", "no"], "\u00e9": [1]}),
        {200},
    ),
    ("logit_bias id past the vocabulary", "/v1/completions", completion(logit_bias={"1000000000": 5}), {400}),
    ("logit_bias id past the vocabulary, chat", "/v1/chat/completions", chat(logit_bias={str(2**70): -5}), {400}),
    ("logit_bias negative id", "/v1/completions", completion(logit_bias={"-1": 5}), {400}),
    ("logit_bias id not a number", "/v1/completions", completion(logit_bias={"hello": 5}), {400}),
    ("logit_bias NaN", "/v1/completions", '{"prompt": "Hi", "max_tokens": 2, "logit_bias": {"5": NaN}}', {400}),
    ("logit_bias huge, clamped", "/v1/completions", completion(logit_bias={"5": 1e300, "6": -1e300}), {200}),
    ("huge top_k", "/v1/completions", completion(top_k=10**9, temperature=1, seed=7), {200}),
    ("tiny temperature", "/v1/completions", completion(temperature=1e-30), {200}),
    ("huge temperature", "/v1/completions", completion(temperature=1e30, seed=3), {200}),
    ("largest seed", "/v1/completions", completion(seed=2**63 - 1, temperature=1, n=3), {200}),
    ("every stop id at once", "/v1/completions", completion(stop_token_ids=list(range(300)), min_tokens=1), {200}),
]


def _raw(body: dict | str) -> bytes:
    text = body if isinstance(body, str) else json.dumps(body)  # json.dumps escapes lone surrogates as \\udxxx
    return text.encode()


@pytest.mark.parametrize(("name", "path", "body", "statuses"), POISON, ids=[p[0] for p in POISON])
def test_poison_request_then_a_normal_one_succeeds(tiny_server, name, path, body, statuses):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        reply = http.post(path, content=_raw(body), headers={"content-type": "application/json"})
        assert reply.status_code in statuses, f"{name}: {reply.status_code} {reply.text}"
        if reply.status_code >= 400:
            error = reply.json()["error"]
            assert error["code"] == reply.status_code and error["message"], reply.text
        assert http.get("/health").status_code == 200, f"{name} left the engine unhealthy"
        normal = http.post("/v1/completions", json=completion(temperature=0))
        assert normal.status_code == 200, f"after {name}: {normal.text}\n{tiny_server.log_tail()}"
        assert normal.json()["usage"]["completion_tokens"] == 4


def test_streamed_poison_gets_a_400_before_the_stream(tiny_server):
    body = completion(stream=True, seed=2**64, temperature=1)
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "seed"


def test_messages_render_off_the_event_loop(tiny_server):
    """/health answers while many chat requests render at once."""
    import concurrent.futures

    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: http.post("/v1/chat/completions", json=chat(f"Hi {i}")), range(8)))
            assert http.get("/health", timeout=5).status_code == 200
    assert [r.status_code for r in replies] == [200] * 8
