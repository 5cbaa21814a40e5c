"""schemathesis against a real server's /openapi.json: requests generated from the schema (valid and invalid), with
OpenAPI conformance checks on. No request may get a 5xx, each answer must be one the schema documents (status, content
type, body), invalid data must be refused with a 4xx; and after the run the engine still serves a normal request."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.reliability.conftest import SERVED_NAME

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 25  # about 400 requests: a minute or two on a busy 2-core CI box
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def _short(case) -> None:
    """Short generations: more requests in the same time."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(field) if isinstance(case.body, dict) else None
        if type(value) is int and value > 8:
            case.body[field] = 8


def test_generated_requests_conform_and_never_5xx(tiny_server) -> None:
    # Driven through hypothesis directly: schemathesis' pytest loader does not run on this pytest.
    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
        def conforms(case) -> None:
            _short(case)
            case.call_and_validate(base_url=tiny_server.url, checks=CHECKS, timeout=60)

        conforms()


def test_the_engine_still_serves_after_the_fuzzing(tiny_server) -> None:
    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    reply = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
