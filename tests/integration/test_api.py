"""The HTTP API of one server, through real HTTP against a running server.

Every test talks to alpha of the session's trio (``server``) with the
analyst token, either through :mod:`fdrtd_client` or through raw
``requests`` (``api``) when the wire itself is under test: status codes,
content types, problem documents, server-sent events. Values that could
only come from uploaded data are checked to never appear in any answer.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import fdrtd_client
from fdrtd_client import Client, wire
from fdrtd_client.errors import BadRequest, Forbidden, NotFound
from fdrtd_server import directory, gateway
from fdrtd_server.app import create_app
from fdrtd_server.audit import verify
from fdrtd_server.config import Settings, TokenStore
from fdrtd_server.identity import Identity
from fdrtd_server.local import LocalServer

DATA_HANDLE = re.compile(r"^d-[0-9a-f]{40}$")  # 40 hex digits: 160 random bits
RESULT_HANDLE = re.compile(r"^r-[0-9a-f]{40}$")
SCHEMA_KEYS = {"handle", "format", "columns", "rows", "bytes", "created"}
TIMEOUT = 30.0

CSV_TEXT = "\n".join(
    [
        "site,age,weight",
        "north,34,70.5",
        "south,51,",  # an empty cell: NaN, left out of aggregates
        "east,29,88.25",
        "west,62,64.0",
        "north,45,79.75",
        "",
    ]
)
CSV_WEIGHTS = np.array([70.5, np.nan, 88.25, 64.0, 79.75])


@pytest.fixture(scope="module")
def client(server: LocalServer) -> Iterator[Client]:
    """The analyst of alpha."""
    with server.client(timeout=TIMEOUT) as connected:
        yield connected


@pytest.fixture(scope="module")
def tokens(server: LocalServer) -> dict[str, str]:
    """Extra principals on alpha, created together before any of them is used."""
    store = TokenStore(server.home)
    return {"other": store.add("other"), "api_lister": store.add("api_lister")}


@pytest.fixture(scope="module")
def other(server: LocalServer, tokens: dict[str, str]) -> Iterator[Client]:
    """A second principal on the same server."""
    with Client(server.url, tokens["other"], timeout=TIMEOUT) as connected:
        yield connected


def unknown(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(20)}"


def check_schema_answer(answer: dict[str, Any], columns: dict[str, Any], rows: int) -> None:
    """A dataset description: a handle and a schema, nothing else."""
    assert DATA_HANDLE.match(answer["handle"])
    assert set(answer) <= SCHEMA_KEYS
    assert answer["columns"] == columns
    assert answer["rows"] == rows
    for described in answer["columns"].values():
        assert set(described) == {"dtype", "shape"}


# -- uploads ---------------------------------------------------------------------


def _raw(array: np.ndarray[Any, Any]) -> tuple[dict[str, str], bytes, str]:
    params = {"format": "raw", "dtype": array.dtype.str, "shape": ",".join(map(str, array.shape))}
    return params, array.tobytes(), "application/octet-stream"


# name -> (query parameters, body, content type, expected columns, rows, texts that must not leak)
UPLOADS: dict[str, tuple[dict[str, str], bytes, str, dict[str, Any], int, list[str]]] = {
    "list": (
        *_raw(np.array([1234.5678, 2.0, 3.0])),
        {"value": {"dtype": "<f8", "shape": [3]}},
        3,
        ["1234.5678"],
    ),
    "float32": (
        *_raw(np.array([4321.25, 1.5, 2.5, 3.5], dtype=np.float32)),
        {"value": {"dtype": "<f4", "shape": [4]}},
        4,
        ["4321.25"],
    ),
    "int64": (
        *_raw(np.array([987654321, 7, 8], dtype=np.int64)),
        {"value": {"dtype": "<i8", "shape": [3]}},
        3,
        ["987654321"],
    ),
    "matrix": (
        *_raw(np.arange(12.0).reshape(4, 3) + 5555.5),
        {"value": {"dtype": "<f8", "shape": [4, 3]}},
        4,
        ["5555.5"],
    ),
    "csv": (
        {"format": "csv"},
        CSV_TEXT.encode(),
        "text/csv",
        {
            "site": {"dtype": "text", "shape": [5]},
            "age": {"dtype": "<f8", "shape": [5]},
            "weight": {"dtype": "<f8", "shape": [5]},
        },
        5,
        ["north", "88.25", "79.75"],
    ),
    "json": (
        {"format": "json"},
        json.dumps({"height": [171.25, 180.5, 165.0], "group": ["x1", "y2", "x1"]}).encode(),
        "application/json",
        {"height": {"dtype": "<f8", "shape": [3]}, "group": {"dtype": "text", "shape": [3]}},
        3,
        ["171.25", "x1", "y2"],
    ),
    "json-ndarray": (
        {"format": "json"},
        json.dumps(
            wire.to_jsonable({"m": np.arange(6, dtype=np.int64).reshape(3, 2) + 424242})
        ).encode(),
        "application/json",
        {"m": {"dtype": "<i8", "shape": [3, 2]}},
        3,
        ["424242", "base64"],
    ),
    "msgpack": (
        {"format": "msgpack"},
        wire.packb({"v": np.array([31337.5, 2.0, 3.0]), "w": [6.0, 7.0, 8.0]}),
        wire.MSGPACK,
        {"v": {"dtype": "<f8", "shape": [3]}, "w": {"dtype": "<f8", "shape": [3]}},
        3,
        ["31337.5"],
    ),
}


@pytest.mark.parametrize("case", sorted(UPLOADS))
def test_upload_answers_201_with_handle_and_schema_only(
    server: LocalServer, api: requests.Session, case: str
) -> None:
    params, body, content_type, columns, rows, secrets_ = UPLOADS[case]
    response = api.post(
        server.url + "/v1/data",
        params=params,
        data=body,
        headers={"content-type": content_type},
        timeout=TIMEOUT,
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    check_schema_answer(answer, columns, rows)
    assert answer["format"] == ("raw" if params["format"] == "raw" else "table")
    assert answer["bytes"] == len(body)
    for text in secrets_:
        assert text not in response.text
    assert base64.b64encode(body[:12]).decode() not in response.text
    described = api.get(server.url + f"/v1/data/{answer['handle']}", timeout=TIMEOUT)
    assert described.status_code == 200
    assert described.json() == answer


def test_client_uploads_each_kind_of_data(client: Client, tmp_path: Path) -> None:
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(CSV_TEXT, "utf-8")
    cases: list[tuple[Any, dict[str, Any], int]] = [
        ([1.0, 2.0, 3.0], {"value": {"dtype": "<f8", "shape": [3]}}, 3),
        (np.arange(5, dtype=np.float32), {"value": {"dtype": "<f4", "shape": [5]}}, 5),
        (np.arange(6, dtype=np.int64), {"value": {"dtype": "<i8", "shape": [6]}}, 6),
        (np.ones((7, 2)), {"value": {"dtype": "<f8", "shape": [7, 2]}}, 7),
        (csv_path, UPLOADS["csv"][3], 5),
        (
            {"x": np.arange(4.0), "y": [1, 2, 3, 4], "tag": ["a", "b", "a", "b"]},
            {
                "x": {"dtype": "<f8", "shape": [4]},
                "y": {"dtype": "<i8", "shape": [4]},  # whole numbers stay exact
                "tag": {"dtype": "text", "shape": [4]},
            },
            4,
        ),
    ]
    for data, columns, rows in cases:
        handle = client.upload(data)
        assert isinstance(handle, fdrtd_client.Handle)
        assert handle.kind == "data"
        described = client.describe(handle)
        assert described["handle"] == handle
        check_schema_answer(described, columns, rows)


def test_bad_uploads_get_a_clear_400(server: LocalServer, api: requests.Session) -> None:
    cases = [
        ({"format": "raw", "dtype": "<f8"}, b"\x00" * 12, "upload length"),
        ({"format": "raw", "dtype": "object"}, b"\x00" * 8, "'dtype'"),
        ({"format": "csv"}, b"a,b\n1\n", "line 2"),
        ({"format": "json"}, b"{not json", "JSON"),
        ({"format": "xlsx"}, b"\x00", "'format'"),
        ({"format": "parquet"}, b"\x00", "not a Parquet file"),
    ]
    for params, body, fragment in cases:
        response = api.post(server.url + "/v1/data", params=params, data=body, timeout=TIMEOUT)
        assert response.status_code == 400, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert fragment in response.json()["detail"]


def test_list_shows_only_the_callers_datasets(
    server: LocalServer, client: Client, tokens: dict[str, str]
) -> None:
    with Client(server.url, tokens["api_lister"], timeout=TIMEOUT) as lister:
        mine = {lister.upload([1.0, 2.0, 3.0]), lister.upload(np.arange(8, dtype=np.int64))}
        theirs = client.upload([4.0, 5.0, 6.0])
        listed = lister.datasets()
    assert {entry["handle"] for entry in listed} == mine
    for entry in listed:
        assert set(entry) <= SCHEMA_KEYS
    assert theirs not in {entry["handle"] for entry in listed}
    assert mine.isdisjoint(entry["handle"] for entry in client.datasets())
    assert client.describe(theirs)["rows"] == 3


def test_describe_returns_schema_only(server: LocalServer, api: requests.Session) -> None:
    values = np.array([0.125, 271828.5, 3.0, 4.0])
    params, body, _ = _raw(values)
    handle = api.post(server.url + "/v1/data", params=params, data=body, timeout=TIMEOUT).json()[
        "handle"
    ]
    response = api.get(server.url + f"/v1/data/{handle}", timeout=TIMEOUT)
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == SCHEMA_KEYS
    assert answer["format"] == "raw"
    assert answer["bytes"] == 32
    assert "271828" not in response.text
    msgpacked = api.get(
        server.url + f"/v1/data/{handle}", headers={"accept": wire.MSGPACK}, timeout=TIMEOUT
    )
    assert msgpacked.headers["content-type"] == wire.MSGPACK
    assert wire.unpackb(msgpacked.content) == answer


# -- computations ----------------------------------------------------------------


def test_map_aggregate_matches_numpy(client: Client) -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(10.0, 3.0, 200)
    result = client.compute("map", "aggregate", data=client.upload(values)).result(TIMEOUT)
    assert set(result) == {"count", "sum", "sum_squares"}  # no single record's extremes
    assert result["count"] == 200
    assert result["sum"] == pytest.approx(values.sum(), rel=1e-12)
    assert result["sum_squares"] == pytest.approx(np.square(values).sum(), rel=1e-12)

    small = np.array([3, -7, 12, 5], dtype=np.int64)
    result = client.compute("map", "aggregate", data=client.upload(small)).result(TIMEOUT)
    assert (result["count"], result["sum"], result["sum_squares"]) == (4, 13.0, 227.0)

    single = np.array([1.5, 2.25, 4.0, 8.5], dtype=np.float32)
    result = client.compute("map", "aggregate", data=client.upload(single)).result(TIMEOUT)
    assert result["sum"] == float(single.astype(np.float64).sum())


def test_map_aggregate_of_a_matrix_is_per_column(client: Client) -> None:
    matrix = np.arange(15.0).reshape(5, 3) * 1.5
    result = client.compute("map", "aggregate", data=client.upload(matrix)).result(TIMEOUT)
    assert result["count"] == 5
    np.testing.assert_array_equal(result["sum"], matrix.sum(axis=0))
    np.testing.assert_array_equal(result["sum_squares"], np.square(matrix).sum(axis=0))


def test_map_aggregate_of_a_csv_column_skips_empty_cells(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(CSV_TEXT, "utf-8")
    handle = client.upload(path)
    result = client.compute("map", "aggregate", data=handle, column="weight").result(TIMEOUT)
    finite = CSV_WEIGHTS[~np.isnan(CSV_WEIGHTS)]
    assert result["count"] == 4
    assert result["sum"] == finite.sum() == 302.5
    assert result["sum_squares"] == np.square(finite).sum()
    ages = client.compute("map", "aggregate", data=handle, column="age").result(TIMEOUT)
    assert (ages["count"], ages["sum"]) == (5, 221.0)
    with pytest.raises(BadRequest) as raised:
        client.compute("map", "aggregate", data=handle, column="site").result(TIMEOUT)
    assert "numeric" in raised.value.detail
    with pytest.raises(BadRequest) as raised:
        client.compute("map", "aggregate", data=handle).result(TIMEOUT)
    assert "'column'" in raised.value.detail


def test_histogram_suppresses_small_cells(client: Client) -> None:
    values = np.array([0.5] * 5 + [1.5] * 2 + [2.5] * 3 + [3.25, 3.5, 3.75, 3.9])
    edges = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    result = client.compute("map", "aggregate", data=client.upload(values), bins=edges).result(
        TIMEOUT
    )
    assert result["count"] == 14
    histogram = result["histogram"]
    np.testing.assert_array_equal(histogram["edges"], edges)
    # cells [5, 2, 3, 4, 0]: the 2 is under the default minimum cohort of 3, and the
    # released count would give it away alone, so the 3 is hidden too; 0 stays 0
    assert histogram["counts"] == [5, None, None, 4, 0]
    assert (histogram["other"], histogram["suppressed"]) == (0, [1, 2])
    with pytest.raises(BadRequest) as raised:
        client.compute("map", "aggregate", data=client.upload(values), bins=[2.0, 1.0]).result(
            TIMEOUT
        )
    assert "'bins'" in raised.value.detail


def test_dataset_below_minimum_cohort_is_refused(
    server: LocalServer, client: Client, api: requests.Session
) -> None:
    handle = client.upload([1.0, 2.0])
    job = client.compute("map", "aggregate", data=handle)
    with pytest.raises(Forbidden) as raised:
        job.result(TIMEOUT)
    assert raised.value.status == 403
    assert "minimum cohort of 3" in raised.value.detail
    view = api.get(server.url + f"/v1/results/{job.handle}", timeout=TIMEOUT).json()
    assert view["status"] == "failed"
    assert view["error"]["status"] == 403
    assert "minimum cohort" in view["error"]["detail"]
    assert "value" not in view
    with pytest.raises(Forbidden):
        client.compute("example", "rows", data=handle).result(TIMEOUT)


def test_compute_refuses_bad_requests(server: LocalServer, api: requests.Session) -> None:
    url = server.url + "/v1/compute"
    cases: list[tuple[Any, int, str]] = [
        ({"microservice": "Map!", "function": "aggregate"}, 400, "'microservice'"),
        ({"microservice": "map", "function": "aggregate", "inputs": [1]}, 400, "'inputs'"),
        ({"microservice": "nosuch", "function": "thing"}, 404, "no microservice 'nosuch'"),
        ({"microservice": "data", "function": "list"}, 400, "not a computation"),
        (
            {"microservice": "map", "function": "aggregate", "session": {"id": "x"}},
            400,
            "'session.id'",
        ),
    ]
    for body, status, fragment in cases:
        response = api.post(url, json=body, timeout=TIMEOUT)
        assert response.status_code == status, (body, response.text)
        assert fragment in response.json()["detail"]
    response = api.post(
        url, data=b"microservice=map", headers={"content-type": "text/plain"}, timeout=TIMEOUT
    )
    assert response.status_code == 415
    response = api.post(
        url, data=b"{", headers={"content-type": "application/json"}, timeout=TIMEOUT
    )
    assert response.status_code == 400
    assert requests.post(url, json={}, timeout=TIMEOUT).status_code == 401
    bad = requests.post(url, json={}, headers={"authorization": "Bearer nope"}, timeout=TIMEOUT)
    assert bad.status_code == 401


# -- results -----------------------------------------------------------------------


def _scaled_sum(client: Client, steps: int, delay: float) -> tuple[fdrtd_client.Job, float]:
    values = np.arange(20.0)
    job = client.compute(
        "example", "scaled_sum", data=client.upload(values), factor=2.0, steps=steps, delay=delay
    )
    return job, float(values.sum() * 2.0)


def test_long_poll_returns_when_done(
    server: LocalServer, client: Client, api: requests.Session
) -> None:
    job, expected = _scaled_sum(client, steps=5, delay=0.3)
    url = server.url + f"/v1/results/{job.handle}"
    first = api.get(url + "?wait=0", timeout=TIMEOUT).json()
    assert first["status"] in ("queued", "running")  # the job sleeps 4 x 0.3 s
    assert "value" not in first
    # held for up to 60 s; the client gives up after 40: an answer at all means the
    # server answered when the job was done, not at the end of the wait
    response = api.get(url + "?wait=60", timeout=40)
    assert response.status_code == 200
    view = response.json()
    assert view["status"] == "done"
    assert view["progress"] == 1.0
    assert view["value"] == {"sum": expected}
    assert (view["microservice"], view["function"]) == ("example", "scaled_sum")
    for wait in ("soon", "-1", "61"):
        bad = api.get(server.url + f"/v1/results/{job.handle}?wait={wait}", timeout=TIMEOUT)
        assert bad.status_code == 400
        assert "'wait'" in bad.json()["detail"]


def _read_events(response: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and name:
            events.append((name, json.loads(data)))
            name, data = "", ""
    return events


def test_events_stream_progress_then_done(
    server: LocalServer, client: Client, api: requests.Session
) -> None:
    # The stream reports at most once a second while a job runs, so the job
    # takes well over that (4 x 0.6 s) to show intermediate progress.
    job, expected = _scaled_sum(client, steps=5, delay=0.6)
    with api.get(
        server.url + f"/v1/results/{job.handle}/events", stream=True, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _read_events(response)
    assert {name for name, _ in events} == {"status"}
    *running, (_, final) = events
    assert final["status"] == "done"
    assert final["progress"] == 1.0
    assert final["value"] == {"sum": expected}
    assert running, "no progress event before the end"
    progress = [view["progress"] for _, view in running]
    assert all(view["status"] in ("queued", "running") for _, view in running)
    assert all(0.0 <= p <= 1.0 for p in progress)  # the last step reports 1.0 before "done"
    assert progress == sorted(progress)
    assert all("value" not in view for _, view in running)


def test_job_status_shows_progress(client: Client) -> None:
    job, expected = _scaled_sum(client, steps=5, delay=0.2)
    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        view = job.status()
        seen.append((view["status"], view["progress"]))
        if view["status"] in ("done", "failed"):
            break
        time.sleep(0.02)
    assert seen[-1] == ("done", 1.0)
    assert job.status()["value"] == {"sum": expected}
    progress = [p for _, p in seen]
    assert progress == sorted(progress)
    assert set(progress) <= {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}
    assert any(0.0 < p < 1.0 for p in progress), seen
    assert job.result(TIMEOUT) == {"sum": expected}


def test_release_data_and_result(
    server: LocalServer, client: Client, api: requests.Session
) -> None:
    handle = client.upload(np.arange(5.0))
    job = client.compute("map", "aggregate", data=handle)
    assert job.result(TIMEOUT)["count"] == 5
    client.release(handle)
    job.release()
    with pytest.raises(NotFound):
        client.describe(handle)
    with pytest.raises(NotFound):
        job.status()
    assert handle not in {entry["handle"] for entry in client.datasets()}
    with pytest.raises(NotFound):
        client.compute("map", "aggregate", data=handle).result(TIMEOUT)
    for path in (f"/v1/data/{handle}", f"/v1/results/{job.handle}"):
        assert api.get(server.url + path, timeout=TIMEOUT).status_code == 404
        again = api.delete(server.url + path, timeout=TIMEOUT)
        assert again.status_code == 404
        assert again.headers["content-type"] == "application/problem+json"
    with pytest.raises(NotFound):
        client.release(handle)
    with pytest.raises(NotFound):
        client.release(job.handle)


def test_release_answers(server: LocalServer, client: Client, api: requests.Session) -> None:
    handle = client.upload(np.arange(4.0))
    job = client.compute("map", "aggregate", data=handle)
    job.result(TIMEOUT)
    response = api.delete(server.url + f"/v1/data/{handle}", timeout=TIMEOUT)
    assert (response.status_code, response.json()) == (200, {"handle": handle, "released": True})
    response = api.delete(server.url + f"/v1/results/{job.handle}", timeout=TIMEOUT)
    assert (response.status_code, response.json()) == (
        200,
        {"result": job.handle, "released": True},
    )


def test_malformed_handles_are_refused(server: LocalServer, api: requests.Session) -> None:
    cases = {
        "/v1/results/d-" + "0" * 40: "not another kind of handle",
        "/v1/results/r-short": "must be a result handle",
        "/v1/data/r-" + "0" * 40: "not another kind of handle",
        "/v1/data/nonsense": "must be a data handle",
    }
    for path, fragment in cases.items():
        response = api.get(server.url + path, timeout=TIMEOUT)
        assert response.status_code == 400, path
        assert response.headers["content-type"] == "application/problem+json"
        assert fragment in response.json()["detail"], path


# -- isolation between principals -----------------------------------------------


def _problem(action: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(NotFound) as raised:
        action()
    return raised.value.status, raised.value.detail


def test_another_principal_cannot_touch_handles(
    server: LocalServer, client: Client, other: Client, tokens: dict[str, str]
) -> None:
    handle = client.upload(np.arange(10.0))
    job = client.compute("map", "aggregate", data=handle)
    assert job.result(TIMEOUT)["count"] == 10
    d_unknown, r_unknown = unknown("d"), unknown("r")

    assert handle not in {entry["handle"] for entry in other.datasets()}
    assert _problem(lambda: other.describe(handle)) == _problem(lambda: other.describe(d_unknown))
    assert _problem(
        lambda: other.compute("map", "aggregate", data=handle).result(TIMEOUT)
    ) == _problem(lambda: other.compute("map", "aggregate", data=d_unknown).result(TIMEOUT))
    assert _problem(lambda: other.job(job.handle).status()) == _problem(
        lambda: other.job(r_unknown).status()
    )
    assert _problem(lambda: other.job(job.handle).status(wait=1)) == (
        404,
        "no result with this handle",
    )
    assert _problem(lambda: other.release(handle)) == _problem(lambda: other.release(d_unknown))
    assert _problem(lambda: other.release(job.handle)) == _problem(lambda: other.release(r_unknown))
    assert _problem(lambda: other.describe(handle)) == (404, "no dataset with this handle")

    # the raw answers are byte for byte those of unknown handles
    headers = {"authorization": f"Bearer {tokens['other']}"}
    for mine, theirs in ((handle, d_unknown), (job.handle, r_unknown)):
        kind = "data" if mine.startswith("d-") else "results"
        for method in ("GET", "DELETE"):
            seen = requests.request(
                method, f"{server.url}/v1/{kind}/{mine}", headers=headers, timeout=TIMEOUT
            )
            fresh = requests.request(
                method, f"{server.url}/v1/{kind}/{theirs}", headers=headers, timeout=TIMEOUT
            )
            assert (seen.status_code, seen.content) == (fresh.status_code, fresh.content)
    events = requests.get(
        f"{server.url}/v1/results/{job.handle}/events", headers=headers, timeout=TIMEOUT
    )
    assert events.status_code == 404

    # nothing the other principal tried changed the owner's handles (asked anew:
    # job.result() would answer from the view it kept)
    assert client.describe(handle)["rows"] == 10
    assert client.job(job.handle).result(TIMEOUT)["count"] == 10


# -- content negotiation ---------------------------------------------------------


def test_content_negotiation(server: LocalServer, client: Client, api: requests.Session) -> None:
    matrix = np.arange(10.0).reshape(5, 2)
    handle = client.upload(matrix)
    body = {
        "microservice": "map",
        "function": "aggregate",
        "inputs": {"data": handle, "column": "value"},
    }
    started = api.post(
        server.url + "/v1/compute",
        data=wire.packb(body),
        headers={"content-type": wire.MSGPACK},
        timeout=TIMEOUT,
    )
    assert started.status_code == 202
    assert started.headers["content-type"] == "application/json"
    assert RESULT_HANDLE.match(started.json()["result"])
    assert started.json()["status"] in ("queued", "running")
    result = started.json()["result"]

    as_json = api.get(
        server.url + f"/v1/results/{result}?wait=20",
        headers={"accept": "application/json"},
        timeout=TIMEOUT,
    )
    assert as_json.headers["content-type"] == "application/json"
    value = as_json.json()["value"]
    sums = value["sum"]
    assert set(sums) == {"__ndarray__"}
    assert sums["__ndarray__"]["dtype"] == "<f8"
    assert sums["__ndarray__"]["shape"] == [2]
    raw = base64.b64decode(sums["__ndarray__"]["base64"])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f8"), matrix.sum(axis=0))
    np.testing.assert_array_equal(wire.from_jsonable(value)["sum"], matrix.sum(axis=0))

    as_msgpack = api.get(
        server.url + f"/v1/results/{result}", headers={"accept": wire.MSGPACK}, timeout=TIMEOUT
    )
    assert as_msgpack.headers["content-type"] == wire.MSGPACK
    decoded = wire.unpackb(as_msgpack.content)
    assert decoded["status"] == "done"
    assert isinstance(decoded["value"]["sum"], np.ndarray)
    np.testing.assert_array_equal(decoded["value"]["sum_squares"], np.square(matrix).sum(axis=0))

    # arrays inside a msgpack body arrive as arrays (here: histogram edges)
    body = {
        "microservice": "map",
        "function": "aggregate",
        "inputs": {"data": client.upload(np.arange(9.0)), "bins": np.array([0.0, 4.5, 9.0])},
    }
    started = api.post(
        server.url + "/v1/compute",
        data=wire.packb(body),
        headers={"content-type": wire.MSGPACK, "accept": wire.MSGPACK},
        timeout=TIMEOUT,
    )
    assert started.status_code == 202
    assert started.headers["content-type"] == wire.MSGPACK
    histogram = client.job(wire.unpackb(started.content)["result"]).result(TIMEOUT)["histogram"]
    assert histogram["counts"] == [5, 4]
    np.testing.assert_array_equal(histogram["edges"], [0.0, 4.5, 9.0])


def test_problem_documents(server: LocalServer, api: requests.Session) -> None:
    response = api.get(server.url + "/v1/nowhere", timeout=TIMEOUT)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": "HTTP error",
        "status": 404,
        "detail": "no such route; see /v1/openapi.json",
    }
    response = api.put(server.url + "/v1/data", timeout=TIMEOUT)
    assert response.status_code == 405
    unauthorized = requests.get(server.url + "/v1/data", timeout=TIMEOUT)
    assert unauthorized.status_code == 401
    assert "Authorization: Bearer" in unauthorized.json()["detail"]


# -- discovery -----------------------------------------------------------------------


def test_openapi_documents_every_route(server: LocalServer, tmp_path: Path) -> None:
    response = requests.get(server.url + "/v1/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1.")
    assert document["servers"] == [{"url": server.url}]
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    app = create_app(
        Settings(home=tmp_path, name="probe"),
        "nats://127.0.0.1:1",
        extra_routes=[*gateway.routes(), *directory.routes()],
    )
    served = {
        (route.path, method.lower())
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    assert documented == served
    for path, method in documented:
        operation = document["paths"][path][method]
        assert operation["summary"]
        assert any(code.startswith("2") for code in operation["responses"])
        # the live server serves the route too: never "no such route" nor 405
        live = requests.request(
            method, server.url + path.replace("{handle}", unknown("d")), timeout=TIMEOUT
        )
        assert live.status_code != 405, (path, method)
        assert "no such route" not in live.text, (path, method)


def test_health_and_readiness(server: LocalServer) -> None:
    healthz = requests.get(server.url + "/healthz", timeout=TIMEOUT)
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    readyz = requests.get(server.url + "/readyz", timeout=TIMEOUT)
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ready", "server": "alpha"})


def test_identity_is_public(server: LocalServer) -> None:
    response = requests.get(server.url + "/v1/identity", timeout=TIMEOUT)
    assert response.status_code == 200
    entry = response.json()
    assert set(entry) == {"name", "url", "sign_key", "box_key"}
    assert entry["name"] == "alpha"
    assert entry["url"] == server.url
    expected = Identity.load(server.home / "identity", "alpha").public_entry(server.url)
    assert entry == expected.to_dict()
    for key in ("sign_key", "box_key"):
        assert len(base64.b64decode(entry[key])) == 32


def test_microservices_are_listed_with_their_functions(server: LocalServer, client: Client) -> None:
    assert requests.get(server.url + "/v1/microservices", timeout=TIMEOUT).status_code == 401
    found = {entry["name"]: entry for entry in client.microservices()}
    assert {"data", "map", "smpc", "example"} <= set(found)
    assert found["data"]["functions"] == {
        "register": "call",
        "describe": "call",
        "release": "call",
        "list": "call",
        "usage": "call",
    }
    assert found["map"]["functions"] == {"aggregate": "job"}
    assert found["example"]["functions"] == {"rows": "job", "scaled_sum": "job", "version": "call"}
    assert found["example"]["version"] == "1.2.0"
    smpc = found["smpc"]["functions"]
    for function in ("count", "secure_sum", "minimum_maximum", "univariate", "bivariate"):
        assert smpc[function] == "job"
    for entry in found.values():
        assert entry["instances"] == 1
        assert entry["description"]


# -- audit ---------------------------------------------------------------------------


def test_audit_log_is_chained_and_tamper_evident(
    server: LocalServer, client: Client, tmp_path: Path
) -> None:
    handle = client.upload(np.array([61616.5, 2.0, 3.0, 4.0]))
    job = client.compute("map", "aggregate", data=handle)
    job.result(TIMEOUT)
    job.release()
    log = server.home / "audit.log"
    copy = tmp_path / "audit.log"
    shutil.copyfile(log, copy)
    lines = copy.read_text("utf-8").splitlines()
    assert verify(copy) == len(lines)
    assert verify(log) >= len(lines)
    records = [json.loads(line) for line in lines]
    by_target = {(r["action"], r["target"]): r for r in records}
    upload = by_target["upload", handle]
    assert (upload["principal"], upload["outcome"], upload["bytes"]) == ("analyst", "ok", 32)
    computed = by_target["compute", job.handle]
    assert (computed["microservice"], computed["function"]) == ("map", "aggregate")
    assert by_target["release", job.handle]["principal"] == "analyst"
    # "61616.5": the bare digits also turn up by chance in the hex of hashes and handles
    assert "61616.5" not in copy.read_text("utf-8")
    for record in records:
        assert re.fullmatch(r"[0-9a-f]{64}", record["hash"])
    assert records[0]["prev"] == "0" * 64

    tampered = tmp_path / "tampered.log"
    changed = dict(records[0], principal="intruder")
    tampered.write_text(
        "\n".join([json.dumps(changed, sort_keys=True, separators=(",", ":")), *lines[1:]]) + "\n"
    )
    with pytest.raises(ValueError, match="line 1"):
        verify(tampered)

    # a line removed from the middle breaks the chain where it was
    middle = len(lines) // 2
    tampered.write_text("\n".join(lines[:middle] + lines[middle + 1 :]) + "\n")
    with pytest.raises(ValueError, match=f"line {middle + 1}"):
        verify(tampered)

    # rehashing the edited record does not help: the next record's "prev" no longer matches
    body = {k: v for k, v in changed.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    rehashed = f'{text[:-1]},"hash":"{hashlib.sha256(text.encode()).hexdigest()}"}}'
    tampered.write_text("\n".join([rehashed, *lines[1:]]) + "\n")  # in the writer's form
    with pytest.raises(ValueError, match="line 2"):
        verify(tampered)


# -- client API ----------------------------------------------------------------------


def test_client_exports_exactly_its_public_names() -> None:
    public = {
        name
        for name, value in vars(fdrtd_client).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and value is not annotations  # the __future__ feature, here as in fdrtd_client
    }
    assert fdrtd_client.__all__ == sorted(fdrtd_client.__all__)
    assert set(fdrtd_client.__all__) == public
    assert len(fdrtd_client.__all__) == len(public)
    errors = fdrtd_client.errors
    exceptions = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    assert exceptions <= public
    for name in fdrtd_client.__all__:
        assert getattr(fdrtd_client, name).__module__.startswith("fdrtd_client")
