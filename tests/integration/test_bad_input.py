"""Bad input never breaks a server, never leaks, and is answered with a 4xx problem document.

Invariant 6 ("bad input gets a 4xx answer with a message a person
understands") against real servers over real HTTP: malformed, mistyped,
unauthorised, hostile and oversized requests to every endpoint. Each answer
must be an RFC 9457 problem document (``application/problem+json`` with
``type``, ``title``, ``status`` and a human ``detail``) that never echoes
the value that was sent; after each test the server must still be healthy,
and a dataset uploaded before the first bad request must still compute the
same result after the last one.

Most tests use alpha of the session's trio. The size limits need their own
server, started with ``FDRTD_MAX_BODY_BYTES=4096`` and
``FDRTD_MAX_UPLOAD_BYTES=65536``.

Computations validate their inputs when they run, so a bad input there may
be answered either at once (a problem document from ``/v1/compute``) or by
a failed result whose ``error`` carries the 4xx status and the detail;
:func:`outcome` accepts either and checks both the same way.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import requests
from conftest import assert_healthy

from fdrtd_client import wire
from fdrtd_server.local import LocalFederation, LocalServer

MARKER = "QZXMARKER7741"
"""Sent in bad fields; it must never come back."""
NUMBER_MARKER = 918273.645
NUMBER_MARKER_TEXT = "918273"
PROBLEM_KEYS = {"type", "title", "status", "detail"}
MSGPACK = "application/msgpack"
UNKNOWN_DATA = "d-" + "0" * 40
UNKNOWN_RESULT = "r-" + "0" * 40
PRECIOUS = np.array([3.25, -1.5, 12.0, 7.75, 0.5, 4.0, 2.25, 9.5])
"""Uploaded before the first bad request; must compute the same after the last."""


# -- helpers -------------------------------------------------------------------


def check_detail(detail: Any) -> None:
    """A detail a person can read: a sentence, not a repr, a dump or a traceback."""
    assert isinstance(detail, str)
    assert len(detail) >= 12 and " " in detail, detail
    assert not detail.startswith(("{", "[", "<", "b'")), detail
    for word in ("Traceback", "Error(", "Exception", "\n"):
        assert word not in detail, detail


def assert_no_echo(text: str) -> None:
    """Neither marker appears in an answer."""
    assert MARKER.lower() not in text.lower()
    assert NUMBER_MARKER_TEXT not in text


def assert_problem(response: requests.Response, status: int, *mentions: str) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem document with ``status`` and a human detail."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media == "application/problem+json", media
    body = response.json()
    assert isinstance(body, dict)
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    check_detail(body["detail"])
    for word in mentions:
        assert word in body["detail"], (word, body["detail"])
    assert_no_echo(response.text)
    return body


def headers(server: LocalServer, **more: str) -> dict[str, str]:
    """The analyst's authorization header plus ``more``."""
    return {"authorization": f"Bearer {server.token}", **more}


def post_compute(
    server: LocalServer, body: Any, *, content_type: str = "application/json"
) -> requests.Response:
    """POST a computation; ``body`` is encoded for ``content_type`` unless it is bytes."""
    if isinstance(body, bytes):
        data = body
    elif content_type == MSGPACK:
        data = wire.packb(body)
    else:
        data = json.dumps(body).encode()
    return requests.post(
        server.url + "/v1/compute",
        data=data,
        headers=headers(server, **{"content-type": content_type}),
        timeout=30,
    )


def outcome(server: LocalServer, body: Any, *, content_type: str = "application/json") -> int:
    """Start a computation and return the 4xx status it ends with, checking every answer.

    A 4xx from ``/v1/compute`` must be a problem document; a 202 must lead to
    a result that fails with a 4xx ``error`` whose detail is human and free of
    the markers.
    """
    response = post_compute(server, body, content_type=content_type)
    if response.status_code != 202:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
        return int(assert_problem(response, response.status_code)["status"])
    handle = response.json()["result"]
    deadline = time.monotonic() + 30
    while True:
        answer = requests.get(
            f"{server.url}/v1/results/{handle}?wait=5", headers=headers(server), timeout=30
        )
        assert answer.status_code == 200, answer.text[:300]
        assert_no_echo(answer.text)
        view = answer.json()
        if view["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
    assert view["status"] == "failed", view
    error = view["error"]
    check_detail(error["detail"])
    assert 400 <= error["status"] < 500, error
    return int(error["status"])


def datasets(server: LocalServer) -> list[str]:
    """Handles of the analyst's datasets (the union of three listings).

    One listing alone may come back short: ``GET /v1/data`` lists keys with
    nats-py's ``KeyValue.keys()``, whose watcher can signal "no more keys"
    before the buffered ones are processed (nats-io/nats.py#842).
    """
    found: set[str] = set()
    for _ in range(3):
        answer = requests.get(server.url + "/v1/data", headers=headers(server), timeout=30)
        assert answer.status_code == 200
        found.update(entry["handle"] for entry in answer.json()["datasets"])
    return sorted(found)


def upload(server: LocalServer, body: Any, **params: str) -> requests.Response:
    """POST ``body`` to ``/v1/data`` with the query ``params``."""
    return requests.post(
        server.url + "/v1/data", params=params, data=body, headers=headers(server), timeout=30
    )


def aggregate(server: LocalServer, handle: str) -> dict[str, Any]:
    """The finished ``map.aggregate`` result over ``handle``."""
    response = post_compute(
        server, {"microservice": "map", "function": "aggregate", "inputs": {"data": handle}}
    )
    assert response.status_code == 202, response.text[:300]
    result = response.json()["result"]
    view = requests.get(
        f"{server.url}/v1/results/{result}?wait=30", headers=headers(server), timeout=60
    ).json()
    assert view["status"] == "done", view
    value: dict[str, Any] = view["value"]
    return value


def raw_upload(server: LocalServer, values: np.ndarray[Any, Any]) -> str:
    """Upload ``values`` as raw float64 and return the data handle."""
    response = upload(server, values.astype("<f8").tobytes(), format="raw", dtype="float64")
    assert response.status_code == 201, response.text[:300]
    handle: str = response.json()["handle"]
    return handle


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def precious(server: LocalServer) -> tuple[str, dict[str, Any]]:
    """A dataset uploaded before any bad request, and what it computes."""
    handle = raw_upload(server, PRECIOUS)
    return handle, aggregate(server, handle)


@pytest.fixture(scope="module")
def result_handle(server: LocalServer, precious: tuple[str, dict[str, Any]]) -> str:
    """A finished result of the analyst."""
    response = post_compute(
        server, {"microservice": "map", "function": "aggregate", "inputs": {"data": precious[0]}}
    )
    assert response.status_code == 202
    handle: str = response.json()["result"]
    requests.get(f"{server.url}/v1/results/{handle}?wait=30", headers=headers(server), timeout=60)
    return handle


@pytest.fixture(autouse=True)
def _still_healthy(server: LocalServer, precious: tuple[str, dict[str, Any]]) -> Iterator[None]:
    yield
    assert_healthy(server)


# -- bodies of /v1/compute -----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json " + MARKER.encode(), "application/json"),
        (b'{"microservice": "map", "function": ', "application/json"),
        (b"", "application/json"),
        (b"{'single': 'quotes'}", "application/json"),
        (b"\xff\xfe" + MARKER.encode(), "application/json"),
        (b"\xc1", MSGPACK),
        (b"\x85\xa1a", MSGPACK),
        (b"", MSGPACK),
        (msgpack.packb({"microservice": "map"}) + b"\x00trailing", MSGPACK),
        (msgpack.packb({1: "int key", "microservice": "map"}), MSGPACK),
    ],
    ids=[
        "json-garbage",
        "json-truncated",
        "json-empty",
        "json-single-quotes",
        "json-not-utf8",
        "msgpack-reserved-byte",
        "msgpack-truncated",
        "msgpack-empty",
        "msgpack-trailing-bytes",
        "msgpack-int-key",
    ],
)
def test_malformed_body_is_400(server: LocalServer, body: bytes, content_type: str) -> None:
    assert_problem(post_compute(server, body, content_type=content_type), 400)


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
@pytest.mark.parametrize(
    "document",
    [[], ["map", "aggregate"], "map.aggregate", 5, 2.5, None, True, MARKER],
    ids=["empty-list", "list", "string", "int", "float", "null", "bool", "marker"],
)
def test_body_that_is_not_a_map_is_400(
    server: LocalServer, document: Any, content_type: str
) -> None:
    assert_problem(post_compute(server, document, content_type=content_type), 400, "map")


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
@pytest.mark.parametrize(
    "change",
    [
        {"microservice": 5},
        {"microservice": None},
        {"microservice": ["map"]},
        {"microservice": {"name": "map"}},
        {"microservice": ""},
        {"microservice": "Map"},
        {"microservice": "map.aggregate"},
        {"microservice": "map*"},
        {"microservice": ">"},
        {"microservice": "map\n"},
        {"microservice": "map " + MARKER},
        {"microservice": "x" * 33},
        {"function": 7},
        {"function": None},
        {"function": ""},
        {"function": "aggregate.x"},
        {"function": "aggregate\n"},
        {"function": "Agg-" + MARKER},
        {"inputs": []},
        {"inputs": "data"},
        {"inputs": 5},
        {"inputs": [MARKER, NUMBER_MARKER]},
        {"session": "abcdefgh-session"},
        {"session": ["abcdefgh-session", ["alpha", "beta"]]},
        {"session": 5},
        {"session": {"id": 12345678, "parties": ["alpha", "beta"]}},
        {"session": {"parties": ["alpha", "beta"]}},
        {"session": {"id": "abcdefgh-session"}},
    ],
    ids=lambda change: repr(change)[:40],
)
def test_wrong_types_and_names_are_400(
    server: LocalServer,
    precious: tuple[str, dict[str, Any]],
    change: dict[str, Any],
    content_type: str,
) -> None:
    body = {"microservice": "map", "function": "aggregate", "inputs": {"data": precious[0]}}
    body.update(change)
    key = next(iter(change))
    assert_problem(post_compute(server, body, content_type=content_type), 400, f"'{key}")


@pytest.mark.parametrize(
    "session_id",
    [
        "short",
        "x" * 65,
        "has space" + "x" * 4,
        "dots.in.the.id",
        "wild*card-id",
        "gt>subject-id",
        "slash/../id-1",
        "abcdefgh\n",
        "abcdefgh\r\nPUB x 1",
        "nul\x00abcdefgh",
        "unicodé-abcdef",
        "١٢٣٤٥٦٧٨٩٠",
        MARKER + "!",
    ],
)
def test_session_ids_with_bad_characters_are_400(
    server: LocalServer, precious: tuple[str, dict[str, Any]], session_id: str
) -> None:
    body = {
        "microservice": "smpc",
        "function": "count",
        "inputs": {"data": precious[0]},
        "session": {"id": session_id, "parties": ["alpha", "beta"]},
    }
    assert_problem(post_compute(server, body), 400, "'session.id'")


@pytest.mark.parametrize(
    "parties",
    [
        ["alpha", "alpha"],
        ["alpha", "beta", "alpha"],
        ["alpha"],
        [],
        "alpha,beta",
        {"alpha": 1, "beta": 2},
        ["alpha", 5],
        ["alpha", None],
        ["alpha", "Beta"],
        ["alpha", "beta\n"],
        ["alpha", "be.ta"],
        ["alpha", "x" * 64],  # server names have at most 63 characters
        ["alpha", MARKER],
        [f"p{i}" for i in range(65)],
    ],
    ids=lambda parties: repr(parties)[:30],
)
def test_bad_parties_are_400(
    server: LocalServer, precious: tuple[str, dict[str, Any]], parties: Any
) -> None:
    body = {
        "microservice": "smpc",
        "function": "count",
        "inputs": {"data": precious[0]},
        "session": {"id": "bad-parties-" + secrets.token_hex(16), "parties": parties},
    }
    assert_problem(post_compute(server, body), 400, "'session.parties'")


def test_unknown_microservice_is_404_and_named(server: LocalServer) -> None:
    body = {"microservice": "zz_nosuch", "function": "aggregate", "inputs": {}}
    assert_problem(post_compute(server, body), 404, "'zz_nosuch'")
    body = {"microservice": "map", "function": "zz_nosuch_fn", "inputs": {}}
    assert_problem(post_compute(server, body), 404, "'zz_nosuch_fn'")


@pytest.mark.parametrize(
    ("microservice", "function"),
    [("example", "version"), ("data", "list")],
)
def test_call_function_cannot_be_started_as_computation(
    server: LocalServer, microservice: str, function: str
) -> None:
    body = {"microservice": microservice, "function": function, "inputs": {}}
    assert_problem(post_compute(server, body), 400, f"'{microservice}.{function}'")


@pytest.mark.parametrize(
    "inputs",
    [
        {"handle": "{data}"},
        {"handle": "{data}", "format": "raw", "size": -1},
        {"handle": "{data}", "format": "raw", "dtype": "uint8", "size": 64},
    ],
    ids=["release", "register-bad-size", "register-as-bytes"],
)
def test_call_function_started_as_computation_changes_nothing(
    server: LocalServer, inputs: dict[str, Any]
) -> None:
    """``data.release``/``data.register`` via /v1/compute are refused and have no effect."""
    handle = raw_upload(server, PRECIOUS)
    before = requests.get(f"{server.url}/v1/data/{handle}", headers=headers(server), timeout=30)
    assert before.status_code == 200
    function = "release" if "size" not in inputs else "register"
    body = {
        "microservice": "data",
        "function": function,
        "inputs": {key: handle if value == "{data}" else value for key, value in inputs.items()},
    }
    response = post_compute(server, body)
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)
    after = requests.get(f"{server.url}/v1/data/{handle}", headers=headers(server), timeout=30)
    assert after.status_code == 200, "the dataset was changed by a refused request"
    assert after.json() == before.json()
    assert aggregate(server, handle)["sum"] == float(PRECIOUS.sum())


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/x-yaml"],
)
def test_unsupported_content_type_is_415(server: LocalServer, content_type: str) -> None:
    body = json.dumps({"microservice": "map", "function": "aggregate", "inputs": {}}).encode()
    assert_problem(post_compute(server, body, content_type=content_type), 415)


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
def test_deeply_nested_bodies_are_400(server: LocalServer, content_type: str) -> None:
    depth = 100_000
    if content_type == MSGPACK:
        body = b"\x91" * depth + b"\x90"
    else:
        body = b'{"microservice":"map","function":"aggregate","inputs":{"x":'
        body += b"[" * depth + b"]" * depth + b"}}"
    assert_problem(post_compute(server, body, content_type=content_type), 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"microservice":"map","function":"aggregate","inputs":{"x":100000000000000000000000}}',
        b'{"microservice":"map","function":"aggregate","inputs":{"x":-100000000000000000000000}}',
        b'{"microservice":"smpc","function":"count","inputs":{},'
        b'"session":{"id":"abcdefgh-big-0123456789abcdef","parties":["alpha","beta"],'
        b'"x":100000000000000000000000}}',
        b'{"microservice":"map","function":"aggregate","inputs":{"x":'
        + b"[" * 520
        + b"]" * 520
        + b"}}",
    ],
    ids=["huge-int", "huge-negative-int", "huge-int-in-session", "nesting-520"],
)
def test_json_that_cannot_go_on_the_bus_is_400(server: LocalServer, body: bytes) -> None:
    assert_problem(post_compute(server, body), 400)


def test_msgpack_extension_that_is_not_an_array_is_400(server: LocalServer) -> None:
    body = {
        "microservice": "map",
        "function": "aggregate",
        "inputs": {"data": msgpack.ExtType(42, MARKER.encode())},
    }
    packed = msgpack.packb(body)
    assert_problem(post_compute(server, packed, content_type=MSGPACK), 400)


@pytest.mark.parametrize(
    "parts",
    [
        ["<f8", [3], b"\x00" * 7],
        ["<f8", [3], b"\x00" * 25],
        ["<f8", [1_000_000_000_000], b"\x00" * 8],
        ["|O", [1], b"\x00" * 8],
        ["<U4", [1], b"\x00" * 16],
        ["<f8", [-1], b""],
        ["<f8", "3", b"\x00" * 24],
        ["<f8", [1] * 9, b"\x00" * 8],
        ["no-such-dtype", [1], b"\x00" * 8],
        ["<f8", [1]],
        [MARKER, [1], b"\x00" * 8],
    ],
    ids=[
        "short-bytes",
        "long-bytes",
        "huge-shape",
        "object",
        "unicode",
        "negative",
        "shape-str",
        "nine-dims",
        "bad-dtype",
        "two-parts",
        "marker-dtype",
    ],
)
def test_lying_ndarray_extension_is_400(server: LocalServer, parts: list[Any]) -> None:
    array = msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb(parts))
    body = msgpack.packb({"microservice": "map", "function": "aggregate", "inputs": {"a": array}})
    assert_problem(post_compute(server, body, content_type=MSGPACK), 400)


def test_lying_json_ndarray_is_400(server: LocalServer) -> None:
    body = {
        "microservice": "map",
        "function": "aggregate",
        "inputs": {"a": {"__ndarray__": {"dtype": "<f8", "shape": [4], "base64": "AAAAAAAAAAA="}}},
    }
    assert_problem(post_compute(server, body), 400)
    body["inputs"] = {"a": {"__ndarray__": {"dtype": "|O", "shape": [1], "base64": "!!"}}}
    assert_problem(post_compute(server, body), 400)


# -- handles in inputs ---------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
@pytest.mark.parametrize(
    ("value", "status"),
    [
        (UNKNOWN_DATA, 404),
        ("d-" + secrets.token_hex(20), 404),
        (UNKNOWN_RESULT, 400),
        ("{result}", 400),
        ("garbage-" + MARKER, 400),
        ("D-" + "A" * 40, 400),
        ("d-" + "0" * 39, 400),
        ("d-" + "0" * 40 + "\n", 400),
        ("d-" + "0" * 40 + "/../x", 400),
        (NUMBER_MARKER, 400),
        (12345, 400),
        ([UNKNOWN_DATA], 400),
        ({"handle": UNKNOWN_DATA}, 400),
        (None, 400),
        (True, 400),
    ],
    ids=lambda v: repr(v)[:24],
)
@pytest.mark.parametrize(("microservice", "function"), [("map", "aggregate"), ("example", "rows")])
def test_bad_handle_in_inputs_is_4xx(
    server: LocalServer,
    result_handle: str,
    microservice: str,
    function: str,
    value: Any,
    status: int,
    content_type: str,
) -> None:
    if value == "{result}":
        value = result_handle
    body = {"microservice": microservice, "function": function, "inputs": {"data": value}}
    assert outcome(server, body, content_type=content_type) == status


@pytest.mark.parametrize(
    "inputs",
    [
        {"column": MARKER},
        {"column": NUMBER_MARKER},
        {"column": ["value", MARKER]},
        {"bins": [MARKER, 1.0]},
        {"bins": [3.0, 1.0, NUMBER_MARKER]},
        {"bins": "0,1," + MARKER},
    ],
    ids=lambda v: repr(v)[:24],
)
def test_bad_inputs_of_a_computation_are_not_echoed(
    server: LocalServer, precious: tuple[str, dict[str, Any]], inputs: dict[str, Any]
) -> None:
    body = {
        "microservice": "map",
        "function": "aggregate",
        "inputs": {"data": precious[0], **inputs},
    }
    assert outcome(server, body) == 400


# -- handles in paths ----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/v1/data/{UNKNOWN_DATA}", 404),
        (f"/v1/data/{UNKNOWN_RESULT}", 400),
        ("/v1/data/{result}", 400),
        ("/v1/data/garbage-" + MARKER, 400),
        ("/v1/data/D-" + "A" * 40, 400),
        ("/v1/data/d-" + "0" * 41, 400),
        ("/v1/data/%00", 400),
        ("/v1/data/d-" + "0" * 40 + "%0A", 400),
        (f"/v1/results/{UNKNOWN_RESULT}", 404),
        (f"/v1/results/{UNKNOWN_DATA}", 400),
        ("/v1/results/{data}", 400),
        ("/v1/results/garbage-" + MARKER, 400),
        ("/v1/results/r-" + "g" * 40, 400),
        (f"/v1/results/{UNKNOWN_RESULT}/events", 404),
        ("/v1/results/{data}/events", 400),
        ("/v1/results/" + MARKER + "/events", 400),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_handle_in_path_is_4xx(
    server: LocalServer,
    precious: tuple[str, dict[str, Any]],
    result_handle: str,
    method: str,
    path: str,
    status: int,
) -> None:
    if method == "DELETE" and path.endswith("/events"):
        status = 405
    path = path.format(data=precious[0], result=result_handle)
    response = requests.request(method, server.url + path, headers=headers(server), timeout=30)
    assert_problem(response, status)


@pytest.mark.parametrize(
    "wait", ["-1", "-0.001", "60.5", "61", "1e9", "nan", "inf", "-inf", "", "abc", MARKER, "1,5"]
)
def test_wait_out_of_range_is_400(server: LocalServer, result_handle: str, wait: str) -> None:
    response = requests.get(
        f"{server.url}/v1/results/{result_handle}",
        params={"wait": wait},
        headers=headers(server),
        timeout=30,
    )
    assert_problem(response, 400, "'wait'")


# -- authentication ------------------------------------------------------------

AUTHENTICATED = [
    ("GET", "/v1/microservices"),
    ("GET", "/v1/data"),
    ("POST", "/v1/data"),
    ("GET", "/v1/data/{data}"),
    ("DELETE", "/v1/data/{data}"),
    ("POST", "/v1/compute"),
    ("GET", "/v1/results/{result}"),
    ("GET", "/v1/results/{result}/events"),
    ("DELETE", "/v1/results/{result}"),
]


def _authorizations(token: str) -> list[dict[str, str]]:
    return [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer " + secrets.token_urlsafe(32)},
        {"authorization": "Bearer " + MARKER},
        {"authorization": "Bearer " + token[:-1]},
        {"authorization": "Bearer " + token + "x"},
        {"authorization": "Basic " + token},
        {"authorization": "Token " + token},
        {"authorization": "Bearer" + token},
        {"authorization": token},
        {"x-api-key": token},
    ]


@pytest.mark.parametrize(("method", "path"), AUTHENTICATED, ids=lambda v: str(v))
def test_missing_or_wrong_token_is_401(
    server: LocalServer,
    precious: tuple[str, dict[str, Any]],
    result_handle: str,
    method: str,
    path: str,
) -> None:
    before = datasets(server)
    url = server.url + path.format(data=precious[0], result=result_handle)
    body = json.dumps({"microservice": "map", "function": "aggregate", "inputs": {}}).encode()
    for auth in _authorizations(server.token):
        response = requests.request(
            method, url, headers=auth, data=body if method == "POST" else None, timeout=30
        )
        assert_problem(response, 401)
    assert datasets(server) == before
    # the data and the result were neither released nor changed
    described = requests.get(
        f"{server.url}/v1/data/{precious[0]}", headers=headers(server), timeout=30
    )
    assert described.status_code == 200
    view = requests.get(
        f"{server.url}/v1/results/{result_handle}", headers=headers(server), timeout=30
    )
    assert view.status_code == 200 and view.json()["status"] == "done"


# -- routes and methods --------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v2/data",
        "/v1",
        "/v1/datas",
        "/v1/data/{data}/content",
        "/v1/data/{data}/download",
        "/v1/results/{result}/value",
        "/v1/results/{result}/events/x",
        "/admin",
        "/.env",
        "/v1/" + MARKER,
    ],
)
def test_unknown_route_is_404(
    server: LocalServer, precious: tuple[str, dict[str, Any]], result_handle: str, path: str
) -> None:
    url = server.url + path.format(data=precious[0], result=result_handle)
    for method in ("GET", "POST"):
        assert_problem(requests.request(method, url, headers=headers(server), timeout=30), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/data"),
        ("PATCH", "/v1/data"),
        ("DELETE", "/v1/data"),
        ("POST", "/v1/data/{data}"),
        ("PUT", "/v1/data/{data}"),
        ("GET", "/v1/compute"),
        ("DELETE", "/v1/compute"),
        ("POST", "/v1/results/{result}"),
        ("PUT", "/v1/results/{result}"),
        ("POST", "/v1/results/{result}/events"),
        ("POST", "/v1/microservices"),
        ("DELETE", "/v1/microservices"),
        ("GET", "/v1/peer"),
        ("PUT", "/v1/peer"),
        ("POST", "/healthz"),
        ("POST", "/v1/openapi.json"),
        ("OPTIONS", "/v1/data"),
    ],
    ids=lambda v: str(v),
)
def test_wrong_method_is_405(
    server: LocalServer,
    precious: tuple[str, dict[str, Any]],
    result_handle: str,
    method: str,
    path: str,
) -> None:
    url = server.url + path.format(data=precious[0], result=result_handle)
    assert_problem(requests.request(method, url, headers=headers(server), timeout=30), 405)
    still = requests.get(f"{server.url}/v1/data/{precious[0]}", headers=headers(server), timeout=30)
    assert still.status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"", b"garbage", b"\xc1", msgpack.packb({"v": 1, "from": MARKER}), b"{}"],
    ids=["empty", "garbage", "bad-msgpack", "map", "json"],
)
def test_peer_gateway_refuses_garbage_with_a_problem(server: LocalServer, body: bytes) -> None:
    response = requests.post(
        server.url + "/v1/peer", data=body, headers={"content-type": MSGPACK}, timeout=30
    )
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)


# -- uploads -------------------------------------------------------------------

BAD_UPLOADS: list[tuple[str, dict[str, str], bytes]] = [
    ("format-exe", {"format": "exe"}, b"MZ\x90\x00" + MARKER.encode()),
    ("format-empty", {"format": ""}, b"\x00" * 8),
    ("format-marker", {"format": MARKER}, b"\x00" * 8),
    ("raw-length-not-itemsize", {"format": "raw", "dtype": "float64"}, b"\x00" * 12),
    ("raw-shape-mismatch", {"format": "raw", "dtype": "float64", "shape": "3"}, b"\x00" * 16),
    ("raw-shape-2d-mismatch", {"format": "raw", "dtype": "<i4", "shape": "2,3"}, b"\x00" * 20),
    ("raw-shape-negative", {"format": "raw", "dtype": "uint8", "shape": "-4"}, b"\x00" * 4),
    ("raw-shape-text", {"format": "raw", "dtype": "uint8", "shape": "a,b"}, b"\x00" * 4),
    ("raw-shape-float", {"format": "raw", "dtype": "uint8", "shape": "1e3"}, b"\x00" * 4),
    ("raw-shape-marker", {"format": "raw", "dtype": "uint8", "shape": MARKER}, b"\x00" * 4),
    ("raw-shape-nine-dims", {"format": "raw", "dtype": "uint8", "shape": "1," * 8 + "4"}, b"x" * 4),
    ("raw-shape-huge", {"format": "raw", "dtype": "uint8", "shape": "9" * 24}, b"\x00" * 4),
    ("raw-shape-huge-2d", {"format": "raw", "dtype": "uint8", "shape": "0," + "9" * 24}, b""),
    ("raw-shape-empty", {"format": "raw", "dtype": "uint8", "shape": ","}, b"\x00" * 4),
    ("dtype-object", {"format": "raw", "dtype": "object"}, b"\x00" * 8),
    ("dtype-O", {"format": "raw", "dtype": "O"}, b"\x00" * 8),
    ("dtype-unicode", {"format": "raw", "dtype": "U2"}, b"\x00" * 8),
    ("dtype-bytes", {"format": "raw", "dtype": "S8"}, b"\x00" * 8),
    ("dtype-void", {"format": "raw", "dtype": "V8"}, b"\x00" * 8),
    ("dtype-datetime", {"format": "raw", "dtype": "M8[s]"}, b"\x00" * 8),
    ("dtype-complex", {"format": "raw", "dtype": "c16"}, b"\x00" * 16),
    ("dtype-structured", {"format": "raw", "dtype": "f8,i8"}, b"\x00" * 16),
    ("dtype-subarray", {"format": "raw", "dtype": "(2,)f8"}, b"\x00" * 16),
    ("dtype-marker", {"format": "raw", "dtype": MARKER}, b"\x00" * 8),
    ("csv-empty", {"format": "csv"}, b""),
    ("csv-header-only", {"format": "csv"}, b"age,weight\n"),
    ("csv-ragged-short", {"format": "csv"}, b"a,b\n1,2\n3\n"),
    ("csv-ragged-long", {"format": "csv"}, f"a,b\n1,2\n3,4,{MARKER}\n".encode()),
    ("csv-open-quote", {"format": "csv"}, f'a,b\n"{MARKER},2\n'.encode()),
    ("csv-no-header-name", {"format": "csv"}, b",b\n1,2\n"),
    ("csv-duplicate-header", {"format": "csv"}, b"a,a\n1,2\n"),
    ("csv-latin1", {"format": "csv"}, f"a,b\nd\xe9j\xe0 {MARKER},2\n".encode("latin-1")),
    ("csv-utf16", {"format": "csv"}, "a,b\n1,2\n".encode("utf-16")),
    ("csv-binary", {"format": "csv"}, b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8"),
    ("csv-huge-field", {"format": "csv"}, b"a,b\n" + b"x" * 200_000 + b",2\n"),
    ("json-garbage", {"format": "json"}, b"{not json " + MARKER.encode()),
    ("json-empty", {"format": "json"}, b""),
    ("json-scalar", {"format": "json"}, b"5"),
    ("json-string", {"format": "json"}, f'"{MARKER}"'.encode()),
    ("json-empty-map", {"format": "json"}, b"{}"),
    ("json-mixed-types", {"format": "json"}, f'{{"a": [1, "{MARKER}", 2]}}'.encode()),
    ("json-mixed-list", {"format": "json"}, f'[1.5, "{MARKER}"]'.encode()),
    ("json-mixed-number", {"format": "json"}, f'{{"a": ["x", {NUMBER_MARKER}]}}'.encode()),
    ("json-nested-lists", {"format": "json"}, b'{"a": [[1, 2], [3]]}'),
    ("json-map-in-column", {"format": "json"}, f'{{"a": {{"b": "{MARKER}"}}}}'.encode()),
    ("json-column-scalar", {"format": "json"}, b'{"a": 5}'),
    ("json-unequal-columns", {"format": "json"}, b'{"a": [1, 2], "b": [1]}'),
    ("json-deep", {"format": "json"}, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    (
        "json-lying-ndarray",
        {"format": "json"},
        b'{"a": {"__ndarray__": {"dtype": "<f8", "shape": [4], "base64": "AAAAAAAAAAA="}}}',
    ),
    (
        "json-object-ndarray",
        {"format": "json"},
        b'{"a": {"__ndarray__": {"dtype": "|O", "shape": [1], "base64": "AAAAAAAAAAA="}}}',
    ),
    ("msgpack-garbage", {"format": "msgpack"}, b"\xc1\xc1" + MARKER.encode()),
    ("msgpack-truncated", {"format": "msgpack"}, b"\x82\xa1a\x93\x01"),
    ("msgpack-trailing", {"format": "msgpack"}, msgpack.packb({"a": [1.0]}) + b"\x00"),
    ("msgpack-scalar", {"format": "msgpack"}, msgpack.packb(5)),
    ("msgpack-int-key", {"format": "msgpack"}, msgpack.packb({1: [1.0, 2.0]})),
    ("msgpack-mixed", {"format": "msgpack"}, msgpack.packb({"a": [1.0, MARKER]})),
    ("msgpack-deep", {"format": "msgpack"}, b"\x91" * 100_000 + b"\x90"),
    (
        "msgpack-unknown-ext",
        {"format": "msgpack"},
        msgpack.packb({"a": msgpack.ExtType(42, MARKER.encode())}),
    ),
    (
        "msgpack-lying-ndarray",
        {"format": "msgpack"},
        msgpack.packb(
            {"a": msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb(["<f8", [3], b"\x00" * 7]))}
        ),
    ),
    (
        "msgpack-object-ndarray",
        {"format": "msgpack"},
        msgpack.packb(
            {"a": msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb(["|O", [1], b"\x00" * 8]))}
        ),
    ),
    (
        "msgpack-0d-ndarray",
        {"format": "msgpack"},
        msgpack.packb(
            {"a": msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb(["<f8", [], b"\x00" * 8]))}
        ),
    ),
]


@pytest.mark.parametrize(
    ("params", "body"),
    [(params, body) for _, params, body in BAD_UPLOADS],
    ids=[name for name, _, _ in BAD_UPLOADS],
)
def test_bad_upload_is_400_and_stores_nothing(
    server: LocalServer, params: dict[str, str], body: bytes
) -> None:
    before = datasets(server)
    response = upload(server, body, **params)
    assert_problem(response, 400)
    assert datasets(server) == before


# -- size limits (a server of its own) -----------------------------------------

BODY_LIMIT = 4096
UPLOAD_LIMIT = 65536


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A server with a 4 KiB body limit and a 64 KiB upload limit."""
    root: Path = tmp_path_factory.mktemp("small")
    server = LocalFederation(root, names=("small",)).servers["small"]
    server.start(
        env={
            "FDRTD_MAX_BODY_BYTES": str(BODY_LIMIT),
            "FDRTD_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        }
    )
    try:
        yield server
    finally:
        server.stop()


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"7" * min(size, total - start)


def _compute_body(size: int, content_type: str) -> bytes:
    """A well-formed computation of exactly ``size`` bytes."""

    def encode(pad: int) -> bytes:
        inputs = {"data": UNKNOWN_DATA, "column": "p" * pad}  # declared inputs only
        body = {"microservice": "map", "function": "aggregate", "inputs": inputs}
        return wire.packb(body) if content_type == MSGPACK else json.dumps(body).encode()

    bare = len(encode(0))
    for pad in range(max(size - bare - 4, 0), size - bare + 4):
        data = encode(pad)
        if len(data) == size:
            return data
    raise AssertionError("cannot pad the body to the size asked for")


@pytest.mark.parametrize("content_type", ["application/json", MSGPACK])
def test_body_over_the_limit_is_413(small: LocalServer, content_type: str) -> None:
    before = datasets(small)
    at_limit = post_compute(
        small, _compute_body(BODY_LIMIT, content_type), content_type=content_type
    )
    assert at_limit.status_code == 202, at_limit.text[:300]
    over = post_compute(
        small, _compute_body(BODY_LIMIT + 1, content_type), content_type=content_type
    )
    assert_problem(over, 413)
    chunked = requests.post(
        small.url + "/v1/compute",
        data=_chunks(BODY_LIMIT * 3),
        headers=headers(small, **{"content-type": content_type}),
        timeout=30,
    )
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in chunked.request.headers
    assert_problem(chunked, 413)
    assert datasets(small) == before
    assert_healthy(small)


@pytest.mark.parametrize("fmt", ["raw", "csv", "json", "msgpack"])
def test_upload_over_the_limit_is_413_and_stores_nothing(small: LocalServer, fmt: str) -> None:
    kept = raw_upload(small, PRECIOUS)
    expected = aggregate(small, kept)
    before = datasets(small)
    sized = upload(small, b"7" * (UPLOAD_LIMIT + 1), format=fmt)
    assert sized.request.headers.get("content-length") == str(UPLOAD_LIMIT + 1)
    assert_problem(sized, 413)
    for total in (UPLOAD_LIMIT + 1, UPLOAD_LIMIT * 4):
        chunked = upload(small, _chunks(total, 4096), format=fmt)
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert_problem(chunked, 413)
    assert datasets(small) == before
    assert_healthy(small)
    assert aggregate(small, kept) == expected


def test_upload_at_the_limit_is_accepted(small: LocalServer) -> None:
    before = datasets(small)
    response = upload(small, _chunks(UPLOAD_LIMIT, 4096), format="raw", dtype="uint8")
    assert response.status_code == 201, response.text[:300]
    described = response.json()
    assert described["rows"] == UPLOAD_LIMIT and described["bytes"] == UPLOAD_LIMIT
    assert datasets(small) == sorted([*before, described["handle"]])
    released = requests.delete(
        f"{small.url}/v1/data/{described['handle']}", headers=headers(small), timeout=30
    )
    assert released.status_code == 200
    assert datasets(small) == before


# -- last: nothing that came before changed the data ---------------------------


def test_data_uploaded_before_is_intact(
    server: LocalServer, precious: tuple[str, dict[str, Any]]
) -> None:
    handle, expected = precious
    assert handle in datasets(server)
    described = requests.get(f"{server.url}/v1/data/{handle}", headers=headers(server), timeout=30)
    assert described.status_code == 200
    assert described.json()["rows"] == PRECIOUS.size
    assert aggregate(server, handle) == expected
    assert expected["sum"] == float(PRECIOUS.sum()) and expected["count"] == PRECIOUS.size
