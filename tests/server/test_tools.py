"""Tool call parsers and tool_choice resolution, on text (no model)."""

from __future__ import annotations

import json

import pytest

from vdeploy_engine.config import TOOL_CALL_PARSERS
from vdeploy_engine.server.protocol import ChatCompletionRequest
from vdeploy_engine.server.tools import PARSERS, ToolCallStream, tool_mode

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _names_and_args(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_every_configurable_parser_exists():
    assert set(PARSERS) == set(TOOL_CALL_PARSERS)


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "Sure.", [("f", {"x": 1})]),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"y": "z"}}',
            None,
            [("f", {}), ("g", {"y": "z"})],
        ),
        ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        ("hermes", "no calls here", "no calls here", []),
        ("llama3_json", '{"name": "f", "parameters": {"x": 1}}', None, [("f", {"x": 1})]),
        (
            "llama3_json",
            '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"a": [1]}}',
            None,
            [("f", {}), ("g", {"a": [1]})],
        ),
        ("llama3_json", "The answer is {x}", "The answer is {x}", []),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', None, [("f", {"x": 1})]),
        ("mistral", 'ok [TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}', "ok ", [("f", {"x": 1}), ("g", {})]),
    ],
)
def test_parsers_split_content_and_calls(parser, text, content, calls):
    found_content, found = PARSERS[parser]().parse(text)
    assert found_content == content
    assert _names_and_args(found) == calls
    assert all(c.id.startswith("chatcmpl-tool-") for c in found)


def test_stream_content_stops_before_a_partial_marker():
    hermes = PARSERS["hermes"]()
    assert hermes.content_ready("Hello <tool") == len("Hello ")
    assert hermes.content_ready("Hello <tool_call>{") == len("Hello ")
    assert hermes.content_ready("Hello <b>") == len("Hello <b>")
    llama = PARSERS["llama3_json"]()
    assert llama.content_ready("  {") == 0 and llama.content_ready("<|py") == 0 and llama.content_ready("Hi") == 2


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_defaults_and_refusals():
    assert tool_mode(_request(), False, None).kind == "none"
    assert tool_mode(_request(tools=[TOOL], tool_choice="none"), False, None).kind == "none"
    with pytest.raises(ValueError, match="--enable-auto-tool-choice"):
        tool_mode(_request(tools=[TOOL]), False, None)  # auto is the default with tools, as in vLLM
    assert tool_mode(_request(tools=[TOOL]), True, "hermes").kind == "auto"
    with pytest.raises(ValueError, match="needs `tools`"):
        tool_mode(_request(tool_choice="required"), True, "hermes")
    with pytest.raises(ValueError, match="'g'"):
        tool_mode(_request(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), True, "hermes")


def test_required_constrains_to_calls_of_the_tools():
    mode = tool_mode(_request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False), False, None)
    schema = mode.constraint.json
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["f"]
    content, calls = mode.calls('[{"name": "f", "parameters": {"a": 1}}]')
    assert content is None and _names_and_args(calls) == [("f", {"a": 1})]
    assert mode.finish_reason(calls, "stop") == "tool_calls"


def test_streamed_auto_holds_back_the_call_and_sends_it_whole():
    stream = ToolCallStream(tool_mode(_request(tools=[TOOL]), True, "hermes"))
    pieces = ["Let me check. <to", 'ol_call>{"name": "f", ', '"arguments": {"q": 2}}</tool_call>']
    events = [stream.delta(p, None) for p in pieces] + [stream.delta("", "stop")]
    assert events[0] == ("Let me check. ", None, None)
    assert events[1] == (None, None, None) and events[2] == (None, None, None)
    content, calls, finish = events[3]
    assert content is None and finish == "tool_calls"
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [(0, "f", {"q": 2})]
