"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis 4): no 5xx, every answer matches the schema.

The target is a real embedded ``serve`` process with the tiny model; ``EXCLIP_WAIT_MAX_S`` is short so a
generated ``wait`` cannot hold the run, and the example counts are small so it stays within a minute or
two on 2 cores. Each schema operation becomes one pytest test.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.settings import Settings

# Checks that hold for every operation; the status and content-type checks compare with the schema.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_target(session_launcher):
    proc = session_launcher.embedded(EXCLIP_WAIT_MAX_S="2", EXCLIP_MAX_BATCH="8").wait_ready()
    yield proc.url
    proc.stop()


# The schema comes from the app object (known at collection time, one test per operation); the first
# test checks it is the one the running service serves.
APP_SCHEMA = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


def test_the_fuzzed_schema_is_the_served_one(fuzz_target):
    assert httpx.get(fuzz_target + "/openapi.json", timeout=10).json() == APP_SCHEMA


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_answers_every_generated_request_within_its_schema(case, fuzz_target):
    case.call_and_validate(base_url=fuzz_target, checks=CHECKS, timeout=30)
