"""Tool calling as vLLM does it: `tools` go to the chat template; `tool_choice` decides how calls come back.

- `none` (the default without tools): plain text.
- a named function: the output is constrained to that function's `parameters` schema (structured outputs) and
  returned as one call to it.
- `required`: the output is constrained to a JSON array of one or more `{"name", "parameters"}` calls of the given
  tools (vLLM's schema), returned as those calls.
- `auto` (the default with tools; needs --enable-auto-tool-choice and --tool-call-parser): the model writes freely
  and the parser finds the calls in its text, in the model family's own format (`hermes`: Qwen2.5 and Hermes,
  `<tool_call>{json}</tool_call>`; `llama3_json`: Llama 3.x, JSON objects, optionally after `<|python_tag|>`;
  `mistral`: `[TOOL_CALLS]` then a JSON array, or `[TOOL_CALLS]name[ARGS]{json}` in newer models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vdeploy_engine.sampling_params import StructuredOutputs
from vdeploy_engine.server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    random_id,
)

_DECODER = json.JSONDecoder()


class ToolParser:
    """Finds tool calls in a model's text. `start` marks where calls begin: text before it is content."""

    start: str
    keeps_special_tokens = False  # the marker is a special token: the text must keep special tokens to show it

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls); no calls (and the whole text as content) when the text holds none that parse."""
        index = text.find(self.start)
        if index == -1:
            return text, []
        try:
            calls = [_call(name, arguments) for name, arguments in self._calls(text[index + len(self.start) :])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []
        content = text[:index]
        return (content if content.strip() else None), calls

    def _calls(self, text: str) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def content_ready(self, text: str) -> int:
        """How much of a stream's text is surely content: everything before a (possibly still partial) marker."""
        index = text.find(self.start)
        if index != -1:
            return index
        for keep in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class HermesParser(ToolParser):
    start = "<tool_call>"

    def _calls(self, text: str) -> list[tuple[str, Any]]:
        calls = []
        for block in text.split(self.start):
            body = block.split("</tool_call>")[0].strip()
            if body:
                call = json.loads(body)
                calls.append((call["name"], call.get("arguments", {})))
        return calls


class Llama3JsonParser(ToolParser):
    """Calls are the whole output: JSON objects separated by `;`, `parameters` (or `arguments`) holding the
    arguments. The marker is where the output's first non-blank character is `{` (or `<|python_tag|>`)."""

    start = "{"
    _PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self._PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return text, []
        try:
            return None, [_call(name, arguments) for name, arguments in self._calls(body)]
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []

    def _calls(self, text: str) -> list[tuple[str, Any]]:
        calls, position = [], 0
        while position < len(text):
            call, position = _DECODER.raw_decode(text, position)
            calls.append((call["name"], call.get("parameters", call.get("arguments", {}))))
            position = _skip(text, position, " \t\n;")
        return calls

    def content_ready(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith("{") or _prefix_either(stripped, self._PYTHON_TAG):
            return 0
        return len(text)


class MistralParser(ToolParser):
    start = "[TOOL_CALLS]"
    keeps_special_tokens = True

    def _calls(self, text: str) -> list[tuple[str, Any]]:
        text = text.strip()
        if text.startswith("["):  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            return [(call["name"], call.get("arguments", {})) for call in json.loads(text)]
        calls = []  # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
        for block in text.split(self.start):
            name, _, arguments = block.partition("[ARGS]")
            calls.append((name.strip(), _DECODER.raw_decode(arguments.strip())[0]))
        return calls


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def _call(name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call without a name")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=name, arguments=text))


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _prefix_either(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


# ---------------------------------------------------------------------------------------------------- tool choice


@dataclass
class ToolMode:
    """How a chat request's tool calls come back: `kind` is none, auto, required or named."""

    kind: str
    constraint: StructuredOutputs | None = None
    function: str | None = None  # the named function
    parser: ToolParser | None = None  # auto

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The message's (content, tool calls) from the generated text."""
        if self.kind == "named":
            return None, [_call(self.function, text)]
        if self.kind == "required":
            try:
                return None, [_call(call["name"], call.get("parameters", {})) for call in json.loads(text)]
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens
                return text, []
        if self.kind == "auto":
            return self.parser.parse(text)
        return text, []

    def finish_reason(self, calls: list[ToolCall], reason: str | None) -> str | None:
        """vLLM's: `tool_calls` when auto or required produced calls (a named call ends as the text did)."""
        return "tool_calls" if calls and self.kind in ("auto", "required") and reason == "stop" else reason


class ToolCallStream:
    """One streamed choice's deltas: a named call streams its arguments as they come; auto streams the content
    before the parser's marker and sends the calls whole at the end; required sends its calls at the end."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.text = ""
        self.sent = 0  # characters of content sent
        self.call_id: str | None = None

    def delta(
        self, new_text: str, finish_reason: str | None
    ) -> tuple[str | None, list[DeltaToolCall] | None, str | None]:
        """(content delta, tool call deltas, finish reason) for the choice's next event."""
        self.text += new_text
        mode = self.mode
        if mode.kind == "none":
            return new_text, None, finish_reason
        if mode.kind == "named":
            if self.call_id is None:
                self.call_id = random_id("chatcmpl-tool")
                function = DeltaFunctionCall(name=mode.function, arguments=new_text)
                call = DeltaToolCall(index=0, id=self.call_id, type="function", function=function)
            elif new_text:
                call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=new_text))
            else:
                return None, None, finish_reason
            return None, [call], finish_reason
        if finish_reason is None:
            ready = mode.parser.content_ready(self.text) if mode.kind == "auto" else 0
            return self._content(ready), None, None
        content, calls = mode.calls(self.text)
        content_delta = (content or "")[self.sent :] if calls else self.text[self.sent :]
        deltas = [
            DeltaToolCall(
                index=i,
                id=c.id,
                type="function",
                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments),
            )
            for i, c in enumerate(calls)
        ]
        self.sent += len(content_delta)
        return content_delta or None, deltas or None, mode.finish_reason(calls, finish_reason)

    def _content(self, ready: int) -> str | None:
        if ready <= self.sent:
            return None
        piece, self.sent = self.text[self.sent : ready], ready
        return piece


def tool_mode(body: ChatCompletionRequest, auto_enabled: bool, parser_name: str | None) -> ToolMode:
    """The request's tool mode; ValueError (a 400) for a choice the server cannot honour."""
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if body.tools else "none"
    if choice == "none":
        return ToolMode("none")
    if not body.tools:
        raise ValueError(f"tool_choice {_describe(choice)} needs `tools`.")
    if choice == "auto":
        if not auto_enabled or parser_name is None:
            raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        return ToolMode("auto", parser=PARSERS[parser_name]())
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": tool.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for tool in body.tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolMode("required", StructuredOutputs(json=schema))
    tool = next((t for t in body.tools if t.function.name == choice.function.name), None)
    if tool is None:
        raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in `tools`.")
    return ToolMode("named", StructuredOutputs(json=tool.function.parameters or {"type": "object"}), tool.function.name)


def _describe(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's tool call arguments as objects, not JSON text (the
    Hermes, Llama 3 and Mistral templates iterate over or `tojson` them), as vLLM passes them."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass  # not JSON: left as the client sent it
    return messages
