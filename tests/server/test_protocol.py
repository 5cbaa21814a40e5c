"""Request bodies as vLLM parses them: unknown fields ignored with a warning, known fields checked."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from vdeploy_engine.server.protocol import ChatCompletionRequest, CompletionRequest

HELLO = [{"role": "user", "content": "Hi"}]


def test_unknown_fields_are_ignored_and_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vdeploy_engine.server"):
        body = CompletionRequest.model_validate(
            {"prompt": "Hi", "max_tokens": 3, "metadata": {"a": 1}, "stream_options": {"include_usage": True, "x": 1}}
        )
    assert body.max_tokens == 3 and body.stream_options.include_usage
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "['metadata']" in warned and "['x']" in warned


def test_known_fields_keep_their_types():
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": HELLO, "temperature": "hot"})
    assert caught.value.errors()[0]["loc"] == ("temperature",)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": HELLO, "n": 0})


def test_prompt_logprobs_is_refused_by_name_rather_than_ignored():
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"prompt": "Hi", "prompt_logprobs": 1})
    assert caught.value.errors()[0]["loc"] == ("prompt_logprobs",)
    assert CompletionRequest.model_validate({"prompt": "Hi", "prompt_logprobs": None}).prompt_logprobs is None
