"""The HTTP API keeps its own OpenAPI document and HTTP's rules: schemathesis and 405.

Schemathesis reads ``/v1/openapi.json`` from a real server (one
``fdrtd-server`` process of a :class:`~fdrtd_server.local.LocalFederation`,
with the example plugin and a short session timeout), generates requests
for every operation from the document, including one body per declared
function of ``POST /v1/compute``, sends them with a valid token, and checks
each answer: never a 5xx, a documented status code and content type, and a
body that matches its schema. Then it sends requests that break the
document (wrong types, missing fields, a bad token): never a 5xx either. A
few examples per operation keep the test short; the examples are drawn
deterministically and Hypothesis' example database is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fdrtd_server.local import LocalFederation, LocalServer

EXAMPLES = 8
"""Examples per operation and mode: each one is a real HTTP request (and maybe a job)."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, example_plugin: None) -> Iterator[LocalServer]:
    """One server of its own: generated jobs end within a short session timeout."""
    env = {"FDRTD_SESSION_TIMEOUT": "3"}
    with LocalFederation(tmp_path_factory.mktemp("schemathesis"), ("solo",), env) as federation:
        yield federation.servers["solo"]


def _run(solo: LocalServer, mode: schemathesis.GenerationMode, checks: list[Any]) -> list[str]:
    """Run every operation of the server's document in ``mode``; the operations run."""
    document = requests.get(solo.url + "/v1/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    auth = {"authorization": f"Bearer {solo.token}"}
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES,
            deadline=timedelta(seconds=20),
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call(base_url=solo.url, headers=auth, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Unsatisfiable:
            # an operation that takes nothing has no request that breaks its document
            assert mode == schemathesis.GenerationMode.NEGATIVE
            continue
        ran.append(operation.label)
    return ran


def test_every_operation_keeps_the_openapi_document(solo: LocalServer) -> None:
    ran = _run(solo, schemathesis.GenerationMode.POSITIVE, CHECKS)
    assert "POST /v1/compute" in ran and "GET /v1/results/{handle}" in ran
    assert len(ran) >= 14


def test_requests_that_break_the_document_are_never_a_server_error(solo: LocalServer) -> None:
    ran = _run(solo, schemathesis.GenerationMode.NEGATIVE, [not_a_server_error])
    assert "POST /v1/compute" in ran and "POST /v1/data" in ran


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/data", {"GET", "HEAD", "POST"}),
        ("PATCH", "/v1/data/d-" + "0" * 40, {"GET", "HEAD", "DELETE"}),
        ("POST", "/v1/results/r-" + "0" * 40, {"GET", "HEAD", "DELETE"}),
        ("GET", "/v1/compute", {"POST"}),
        ("DELETE", "/v1/results/r-" + "0" * 40 + "/events", {"GET", "HEAD"}),
    ],
)
def test_405_names_every_method_of_the_path_in_allow(
    solo: LocalServer, method: str, path: str, allowed: set[str]
) -> None:
    response = requests.request(
        method, solo.url + path, headers={"authorization": f"Bearer {solo.token}"}, timeout=30
    )
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("application/problem+json")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
