"""The HTTP API keeps its own OpenAPI document and HTTP's rules: schemathesis and 405.

Schemathesis reads ``/v1/openapi.json`` from a real server (``solo``, one
of the two ``fdrtd-server`` processes of a
:class:`~fdrtd_server.local.LocalFederation`, with the example plugin and a
short session timeout), generates requests for every operation from the
document, including bodies for each declared function of ``POST
/v1/compute``, sends them with a valid token, and checks each answer: never
a 5xx, a documented status code and content type, a body that matches its
schema, and no job that failed with a server error (an ``error.status`` of
500 or more in a 200 view: a crash behind a well-formed answer). Then it
sends requests that break the document (wrong types, missing fields, a bad
token): never a 5xx either.

So that the jobs get past loading their data, generated requests are
*seeded*: every ``data`` input is the handle of a real dataset, column
inputs name its columns, a multi-party computation runs in a session of
``solo`` and ``duo`` with the same request started at ``duo`` too (so the
protocol really runs), result reads ask for results the test started. The
examples are drawn deterministically and Hypothesis' example database is off.
"""

from __future__ import annotations

import contextlib
import copy
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import msgpack
import numpy as np
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
FUNCTION_EXAMPLES = 4
"""Examples of ``POST /v1/compute`` per function (positive, seeded)."""
WAIT = 10
"""The ``wait`` of a seeded computation: long enough for one to end, and short."""
NO_CRASH_STATUS = (503, 504)
"""Server-side error statuses a job may end with without a bug: NATS away, a party timed out."""


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, example_plugin: None
) -> Iterator[LocalFederation]:
    """Two servers of their own: generated jobs end within a short session timeout."""
    env = {
        "FDRTD_SESSION_TIMEOUT": "3",
        "FDRTD_ALLOW_MAP_REDUCE": "true",
        "FDRTD_ALLOW_SET_UNION": "true",
        "FDRTD_ALLOW_SET_INTERSECTION": "true",
        "FDRTD_ALLOW_MATRIX_PRODUCT": "true",
        "FDRTD_ALLOW_VERTICAL_REGRESSION": "true",
    }
    names = ("solo", "duo")
    with LocalFederation(tmp_path_factory.mktemp("schemathesis"), names, env) as federation:
        yield federation


@pytest.fixture(scope="module")
def solo(pair: LocalFederation) -> LocalServer:
    return pair.servers["solo"]


@pytest.fixture(scope="module")
def seeds(pair: LocalFederation) -> dict[str, str]:
    """A real dataset on each server (columns v, w; 30 rows): its handle by server."""
    rng = np.random.default_rng(5)
    handles = {}
    for name, server in pair.servers.items():
        v = rng.normal(size=30)
        data = {"v": v.tolist(), "w": (v + rng.normal(size=30) > 0).astype(float).tolist()}
        handles[name] = str(server.client().upload(data))
    return handles


def _failed_server_side(body: Any) -> str | None:
    """Why a job view tells of a server-side failure (an error status >= 500), if it does."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    status = body["error"].get("status")
    if isinstance(status, int) and status >= 500 and status not in NO_CRASH_STATUS:
        return f"the job failed with status {status}: {str(body['error'].get('detail'))[:300]}"
    return None


@schemathesis.check
def no_server_error_in_the_job(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 200 view of a job (compute with ?wait=, result reads) holds no error status >= 500."""
    if case.operation.label not in ("POST /v1/compute", "GET /v1/results/{handle}"):
        return None
    if response.status_code != 200:
        return None
    content_type = response.headers.get("content-type", [""])
    text = content_type[0] if isinstance(content_type, list) else str(content_type)
    body = msgpack.unpackb(response.content) if "msgpack" in text else response.json()
    why = _failed_server_side(body)
    assert why is None, why
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    no_server_error_in_the_job,
]


class _Seeder:
    """Turns generated requests into ones that reach the functions, and runs the other party."""

    def __init__(self, pair: LocalFederation, handles: dict[str, str]) -> None:
        self.pair, self.handles = pair, handles
        self.results: list[str] = []

    @staticmethod
    def _inputs(inputs: dict[str, Any], handle: str, declared: frozenset[str]) -> dict[str, Any]:
        seeded = dict(inputs)
        if "column" in declared and "column" not in inputs:
            seeded["column"] = "v"  # the datasets have two columns: one must be named
        for key, value in inputs.items():
            if key == "data" and isinstance(value, str):
                seeded[key] = handle
            elif key in ("column", "x", "y", "id") and isinstance(value, str):
                seeded[key] = "w" if key == "y" else "v"
            elif key == "x" and isinstance(value, list) and value:
                seeded[key] = ["v"]
            elif key in ("left", "target_holder") and isinstance(value, str):
                seeded[key] = "solo"  # the functions that name parties: those of the session
            elif key == "right" and isinstance(value, str):
                seeded[key] = "duo"
            elif key == "holders" and isinstance(value, list):
                seeded[key] = ["solo", "duo"]
            elif key == "delay":
                seeded[key] = 0  # the example plugin's waiting is not what is tested here
        return seeded

    def prepare(self, case: Any, declared: frozenset[str]) -> dict[str, Any] | None:
        """Seed ``case`` in place; return the body for duo if the computation is multi-party."""
        label = case.operation.label
        if label == "GET /v1/data/{handle}":
            case.path_parameters["handle"] = self.handles["solo"]
        elif label == "GET /v1/results/{handle}" and self.results:
            case.path_parameters["handle"] = self.results[len(self.results) // 2]
        if label != "POST /v1/compute" or not isinstance(case.body, dict):
            return None
        body = dict(case.body)
        case.query = {**(case.query or {}), "wait": WAIT}
        inputs = body.get("inputs")
        if isinstance(inputs, dict):
            body["inputs"] = self._inputs(inputs, self.handles["solo"], declared)
        mirror = None
        if isinstance(body.get("session"), dict):
            body["session"] = {"id": secrets.token_urlsafe(16), "parties": ["solo", "duo"]}
            mirror = dict(body)
            if isinstance(inputs, dict):
                mirror["inputs"] = self._inputs(inputs, self.handles["duo"], declared)
        case.body = body
        return mirror

    def at_duo(self, body: dict[str, Any]) -> requests.Response:
        duo = self.pair.servers["duo"]
        return requests.post(
            f"{duo.url}/v1/compute?wait={WAIT}",
            json=body,
            headers={"authorization": f"Bearer {duo.token}"},
            timeout=WAIT + 30,
        )

    def remember(self, response: Any) -> None:
        if response.status_code in (200, 202):
            with contextlib.suppress(ValueError):
                handle = response.json().get("result")
                if isinstance(handle, str):
                    self.results.append(handle)


def _operations(
    document: dict[str, Any], seeded: bool
) -> Iterator[tuple[Any, str, frozenset[str] | None]]:
    """Each operation with its label and, for one function of POST /v1/compute, its inputs.

    Seeded, ``POST /v1/compute`` is split into one operation per function (its
    body one ``Compute.*`` schema, not the ``oneOf`` of all of them), so that
    every function gets its examples: drawn from the ``oneOf``, most would
    start the first function.
    """
    schema = schemathesis.openapi.from_dict(document)
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label != "POST /v1/compute" or not seeded:
            yield operation, operation.label, None
            continue
        content = document["paths"]["/v1/compute"]["post"]["requestBody"]["content"]
        for ref in content["application/json"]["schema"]["oneOf"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            component = document["components"]["schemas"][name]
            inputs = component.get("properties", {}).get("inputs", {}).get("properties", {})
            one = copy.deepcopy(document)
            for body in one["paths"]["/v1/compute"]["post"]["requestBody"]["content"].values():
                body["schema"] = ref
            for each in schemathesis.openapi.from_dict(one).get_all_operations():
                if each.ok().label == operation.label:
                    yield each.ok(), f"{operation.label} {name}", frozenset(inputs)


def _check_operation(
    solo: LocalServer,
    operation: Any,
    mode: schemathesis.GenerationMode,
    checks: list[Any],
    seeder: _Seeder | None,
    declared: frozenset[str] | None,
) -> None:
    """Send ``operation``'s examples to ``solo`` (``declared``: the inputs of one function)."""
    auth = {"authorization": f"Bearer {solo.token}"}

    @settings(
        max_examples=EXAMPLES if declared is None else FUNCTION_EXAMPLES,
        deadline=timedelta(seconds=WAIT + 30),
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        mirror = seeder.prepare(case, declared or frozenset()) if seeder else None
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(seeder.at_duo, mirror) if seeder and mirror else None
            response = case.call(base_url=solo.url, headers=auth, timeout=WAIT + 30)
            if other is not None:
                answer = other.result()
                assert answer.status_code < 500, answer.text[:300]
                why = _failed_server_side(answer.json()) if answer.status_code == 200 else None
                assert why is None, f"at duo: {why}"
        if seeder:
            seeder.remember(response)
        case.validate_response(response, checks=checks)

    check()


def _run(
    solo: LocalServer,
    mode: schemathesis.GenerationMode,
    checks: list[Any],
    seeder: _Seeder | None = None,
) -> list[str]:
    """Run every operation of the server's document in ``mode``; the operations run."""
    document = requests.get(solo.url + "/v1/openapi.json", timeout=30).json()
    ran = []
    for operation, label, declared in _operations(document, seeder is not None):
        try:
            _check_operation(solo, operation, mode, checks, seeder, declared)
        except Unsatisfiable:
            # an operation that takes nothing has no request that breaks its document
            assert mode == schemathesis.GenerationMode.NEGATIVE
            continue
        ran.append(label)
    return ran


def test_every_operation_keeps_the_openapi_document(
    pair: LocalFederation, solo: LocalServer, seeds: dict[str, str]
) -> None:
    seeder = _Seeder(pair, seeds)
    ran = _run(solo, schemathesis.GenerationMode.POSITIVE, CHECKS, seeder)
    assert "POST /v1/compute Compute.smpc.median" in ran and "GET /v1/results/{handle}" in ran
    assert len(ran) >= 30


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
