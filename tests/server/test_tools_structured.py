"""Tool calls and structured outputs through a real `vdeploy serve` of SmolLM2-135M (GGUF), driven with the official
openai SDK: the output always parses against the schema, streamed or not."""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import run_server

pytestmark = pytest.mark.slow  # one model load per module

MODEL = "smol"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path, tmp_path_factory):
    argv = ["-m", "vdeploy.cli", "serve", str(smollm2_gguf_path), "--hardware=cpu", "--served-model-name", MODEL]
    argv += ["--max-model-len", "1024", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with run_server(argv, tmp_path_factory.mktemp("tools") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, **{"temperature": 0, "max_tokens": 80, **kwargs})


def _streamed_calls(chunks) -> tuple[dict[int, dict], str | None, str]:
    """Tool calls assembled from stream deltas as the SDK's users do (index -> id, name, arguments)."""
    calls: dict[int, dict] = {}
    content = ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    finish = next(c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason)
    return calls, finish, content


# ---------------------------------------------------------------------------------------------------- tool calls


def test_named_tool_choice_calls_that_function_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    message = _chat(client, messages=ASK, tools=TOOLS, tool_choice=choice).choices[0].message
    [call] = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "London", "Tokyo") and arguments["unit"] in ("celsius", "fahrenheit")

    streamed, _, content = _streamed_calls(
        list(_chat(client, messages=ASK, tools=TOOLS, tool_choice=choice, stream=True))
    )
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [("get_weather", call.function.arguments)]


def test_required_tool_choice_returns_calls_of_the_given_tools(client):
    result = _chat(client, messages=ASK, tools=TOOLS, tool_choice="required")
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "add")
        json.loads(call.function.arguments)

    streamed, finish, _ = _streamed_calls(
        list(_chat(client, messages=ASK, tools=TOOLS, tool_choice="required", stream=True))
    )
    assert finish == "tool_calls"
    expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == expected


def _conversation() -> list[dict]:
    """Earlier turns in which the assistant called the tool (once as tool_calls, then in the Hermes text format)
    and the tool answered: a 135M model follows the pattern."""
    messages: list[dict] = []
    for i, city in enumerate(["Paris", "London", "Tokyo"]):
        call = {"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}}
        if i == 0:
            arguments = json.dumps(call["arguments"])
            function = {"name": "get_weather", "arguments": arguments}
            assistant = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c0", "type": "function", "function": function}],
            }
        else:
            assistant = {"role": "assistant", "content": f"<tool_call>\n{json.dumps(call)}\n</tool_call>"}
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            assistant,
            {"role": "tool", "tool_call_id": f"c{i}", "content": "sunny, 20 C"},
            {"role": "assistant", "content": f"It is sunny and 20 C in {city}."},
        ]
    return messages + [{"role": "user", "content": "What is the weather in London?"}]


def test_auto_tool_choice_parses_hermes_calls_streamed_and_not(client):
    messages = _conversation()
    choice = _chat(client, messages=messages, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "London"
    assert not choice.message.content

    streamed, finish, content = _streamed_calls(list(_chat(client, messages=messages, tools=TOOLS, stream=True)))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [("get_weather", call.function.arguments)]


def test_auto_tool_choice_without_a_call_is_plain_content(client):
    choice = _chat(client, messages=ASK, tools=TOOLS, max_tokens=16).choices[0]
    assert choice.message.tool_calls in ([], None) and choice.finish_reason == "length"
    assert choice.message.content
    chunks = list(_chat(client, messages=ASK, tools=TOOLS, max_tokens=16, stream=True))
    _, _, content = _streamed_calls(chunks)
    assert content == choice.message.content


def test_unknown_named_tool_is_400(server):
    body = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    response = server.http().post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "nope" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- structured outputs


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int
    city: Literal["Paris", "London", "Tokyo"]


class Day(BaseModel):
    day: Literal["mon", "tue", "wed"]
    high: float


class Forecast(BaseModel):
    city: str = Field(max_length=24)
    sunny: bool
    days: list[Day] = Field(max_length=3)


@pytest.mark.parametrize("schema", [Person, Forecast], ids=lambda m: m.__name__)
def test_response_format_json_schema_parses_against_the_schema(client, schema):
    messages = [{"role": "user", "content": f"Describe a {schema.__name__.lower()} in JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema()}}
    for temperature in (0, 1.0):
        result = client.chat.completions.create(
            model=MODEL, messages=messages, response_format=fmt, max_tokens=200, temperature=temperature, seed=1
        )
        assert result.choices[0].finish_reason == "stop"
        schema.model_validate_json(result.choices[0].message.content)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, response_format=fmt, max_tokens=200, temperature=0, stream=True
        )
    )
    schema.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_sdk_parse_helper_gets_a_typed_object(client):
    result = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Who lives in Paris?"}],
        response_format=Person,
        max_tokens=200,
    )
    assert isinstance(result.choices[0].message.parsed, Person)


def test_json_object_is_a_json_object(client):
    result = _chat(
        client,
        messages=[{"role": "user", "content": "A fruit as JSON"}],
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    assert isinstance(json.loads(result.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": r"\d{4}-\d{2}-\d{2}"}, lambda t: re.fullmatch(r"\d{4}-\d{2}-\d{2}", t)),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_grammar": 'root ::= "A" [0-9] [0-9]'}, lambda t: re.fullmatch(r"A\d\d", t)),
        ({"guided_json": Person.model_json_schema()}, Person.model_validate_json),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ],
    ids=["regex", "choice", "grammar", "json", "structured_outputs"],
)
def test_vllm_guided_fields_constrain_completions(client, extra, check):
    result = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=100, temperature=1.0, seed=3, extra_body=extra
    )
    assert check(result.choices[0].text), result.choices[0].text


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_regex": "("},
        {"guided_json": {"type": "object"}, "guided_regex": "a"},
        {"response_format": {"type": "json_schema"}},
    ],
    ids=["bad-regex", "two-constraints", "schema-missing"],
)
def test_a_constraint_that_cannot_work_is_400(server, extra):
    response = server.http().post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
