"""Uploads cannot exhaust a server's memory, freeze it, or fill its disk.

Against real servers over real HTTP: the parse limit (``max_parse_bytes``)
refuses a json or msgpack upload before anything is stored (csv is streamed
and converted in bounded memory, so it is not parse-limited any more: see
test_upload_formats); a large CSV is converted off the event loop, so that
``/healthz`` keeps answering;
the per-client quota (``max_client_bytes``) refuses what would go over it,
counted as stored, also for uploads sent at the same time; hostile dtypes
and msgpack Timestamps get a 400 over HTTP too. After each, the data
uploaded before is intact and the server healthy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import requests
from conftest import assert_healthy

from fdrtd_client import wire
from fdrtd_server.local import LocalFederation, LocalServer

PARSE_LIMIT = 1024 * 1024
QUOTA = 10 * 1024


def headers(server: LocalServer) -> dict[str, str]:
    return {"authorization": f"Bearer {server.token}"}


def upload(server: LocalServer, body: Any, **params: str) -> requests.Response:
    return requests.post(
        server.url + "/v1/data", params=params, data=body, headers=headers(server), timeout=60
    )


def datasets(server: LocalServer) -> dict[str, int]:
    answer = requests.get(server.url + "/v1/data", headers=headers(server), timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    return {entry["handle"]: entry["rows"] for entry in answer.json()["datasets"]}


def total(server: LocalServer, handle: str, **inputs: str) -> float:
    body = {"microservice": "map", "function": "aggregate", "inputs": {"data": handle, **inputs}}
    answer = requests.post(
        server.url + "/v1/compute",
        params={"wait": "20"},
        json=body,
        headers=headers(server),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["status"] == "done", answer.text[:300]
    return float(answer.json()["value"]["sum"])


def refused(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json")
    detail: str = response.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    return detail


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _start(root: Path, name: str, env: dict[str, str]) -> LocalServer:
    server = LocalFederation(root, names=(name,)).servers[name]
    server.start(env=env)
    return server


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A server that parses at most 1 MiB of csv, json or msgpack."""
    server = _start(
        tmp_path_factory.mktemp("tight"), "tight", {"FDRTD_MAX_PARSE_BYTES": str(PARSE_LIMIT)}
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def quota(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A server that keeps at most 10 KiB of datasets per client."""
    server = _start(
        tmp_path_factory.mktemp("quota"), "quota", {"FDRTD_MAX_CLIENT_BYTES": str(QUOTA)}
    )
    try:
        yield server
    finally:
        server.stop()


# -- parse limit -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_upload_over_the_parse_limit_is_413_before_anything_is_stored(
    tight: LocalServer, fmt: str
) -> None:
    kept = upload(tight, np.arange(5.0).tobytes(), format="raw", dtype="<f8")
    assert kept.status_code == 201
    before = datasets(tight)
    bomb = b"\x90" * (2 * 1024 * 1024)  # 2 MiB of empty msgpack arrays
    sized = upload(tight, bomb, format=fmt)
    detail = refused(sized, 413, str(PARSE_LIMIT), "max_parse_bytes", "raw")
    assert "format=raw" in detail
    streamed = upload(tight, chunks(bomb), format=fmt)
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    refused(streamed, 413, "max_parse_bytes")
    assert datasets(tight) == before
    assert total(tight, kept.json()["handle"]) == 10.0
    assert_healthy(tight)


def test_raw_upload_over_the_parse_limit_is_accepted(tight: LocalServer) -> None:
    values = np.ones(PARSE_LIMIT // 8 * 2)  # 2 MiB, never parsed
    response = upload(tight, chunks(values.tobytes()), format="raw", dtype="<f8")
    assert response.status_code == 201, response.text[:300]
    assert total(tight, response.json()["handle"]) == values.size


def test_bomb_under_the_parse_limit_is_a_clear_answer(tight: LocalServer) -> None:
    """Just under the limit: parsed in a child, refused with a 4xx, never a 500."""
    count = PARSE_LIMIT - 16
    bomb = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count
    before = datasets(tight)
    response = upload(tight, bomb, format="msgpack")
    # a million empty records make a column of shape (n, 0): odd, but a table
    assert response.status_code == 201, response.text[:300]
    assert response.json()["columns"]["value"]["shape"] == [count, 0]
    handle = response.json()["handle"]
    requests.delete(f"{tight.url}/v1/data/{handle}", headers=headers(tight), timeout=30)
    deep = b"\x91" * (PARSE_LIMIT - 16) + b"\x90"
    refused(upload(tight, deep, format="msgpack"), 400)
    nested = b"\xdd" + count.to_bytes(4, "big") + b"\x91\x90" * (count // 2)
    assert upload(tight, nested, format="msgpack").status_code == 400
    assert datasets(tight) == before
    assert_healthy(tight)


def test_healthz_answers_while_a_large_csv_registers(server: LocalServer) -> None:
    """The parse runs off the event loop: /healthz is answered while the upload registers.

    Registering starts once the whole body is stored; probes asked after the
    last chunk went out and answered before the upload's own answer came were
    answered while the server parsed. A parse on the event loop would hold
    every such probe until the upload is answered.
    """
    rows = 1_500_000
    csv = b"a,b\n" + b"12.5,7\n" * rows  # ~10 MiB: seconds of parsing
    outcome: dict[str, Any] = {}
    sent = threading.Event()

    def body() -> Iterator[bytes]:
        yield from chunks(csv, 1024 * 1024)
        sent.set()

    def send() -> None:
        outcome["response"] = upload(server, body(), format="csv")
        outcome["answered"] = len(answers)

    answers: list[bool] = []  # one per probe answered, True if asked after the body was sent
    sender = threading.Thread(target=send)
    sender.start()
    with requests.Session() as probe:
        while sender.is_alive():
            after_body = sent.is_set()
            assert probe.get(server.url + "/healthz", timeout=30).status_code == 200
            answers.append(after_body)
    sender.join()
    response = outcome["response"]
    assert response.status_code == 201, response.text[:300]
    assert response.json()["rows"] == rows
    while_registering = sum(answers[: outcome["answered"]])
    assert while_registering >= 3, answers
    handle = response.json()["handle"]
    assert total(server, handle, column="a") == pytest.approx(12.5 * rows)
    requests.delete(f"{server.url}/v1/data/{handle}", headers=headers(server), timeout=30)


# -- quota ----------------------------------------------------------------------------


def test_second_upload_over_the_quota_is_413_and_data_is_intact(quota: LocalServer) -> None:
    first = upload(quota, np.full(768, 2.0).tobytes(), format="raw", dtype="<f8")  # 6 KiB
    assert first.status_code == 201, first.text[:300]
    handle = first.json()["handle"]
    before = datasets(quota)
    second = np.ones(768).tobytes()
    detail = refused(upload(quota, second, format="raw", dtype="<f8"), 413, "quota", str(QUOTA))
    assert "6144" in detail  # what the datasets take now
    refused(upload(quota, chunks(second, 1024), format="raw", dtype="<f8"), 413, "quota")
    # a JSON list of 4 KiB is 16 KiB parsed: what is stored counts
    listed = b"[" + b"1," * 1999 + b"1]"
    refused(upload(quota, listed, format="json"), 413, "quota")
    # a CSV over what is left of the quota is refused as it streams
    refused(upload(quota, chunks(b"x\n" + b"1\n" * 2500, 1024), format="csv"), 413, "quota")
    assert datasets(quota) == before
    assert total(quota, handle) == 2.0 * 768
    # released data frees its share of the quota
    deleted = requests.delete(f"{quota.url}/v1/data/{handle}", headers=headers(quota), timeout=30)
    assert deleted.status_code == 200
    again = upload(quota, second, format="raw", dtype="<f8")
    assert again.status_code == 201, again.text[:300]
    requests.delete(
        f"{quota.url}/v1/data/{again.json()['handle']}", headers=headers(quota), timeout=30
    )
    assert_healthy(quota)


def test_uploads_at_the_same_time_cannot_overrun_the_quota(quota: LocalServer) -> None:
    assert datasets(quota) == {}
    body = np.ones(512).tobytes()  # 4 KiB each: two fit in 10 KiB, not three

    def send(_: int) -> int:
        return upload(quota, body, format="raw", dtype="<f8").status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(send, range(6)))
    assert sorted(set(statuses)) == [201, 413], statuses
    assert statuses.count(201) == 2, statuses
    kept = datasets(quota)
    assert len(kept) == 2
    for handle in kept:
        requests.delete(f"{quota.url}/v1/data/{handle}", headers=headers(quota), timeout=30)


# -- hostile types over HTTP ----------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", ["(2,3", "(99999999999999999999,)f8", "g", "f16", "float128", "c16"]
)
def test_hostile_dtype_upload_is_400(server: LocalServer, dtype: str) -> None:
    before = datasets(server)
    refused(upload(server, b"\x00" * 16, format="raw", dtype=dtype), 400, "'dtype'")
    array = msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb([dtype, [1], b"\x00" * 16]))
    refused(upload(server, msgpack.packb({"a": array}), format="msgpack"), 400)
    computed = requests.post(
        server.url + "/v1/compute",
        data=msgpack.packb(
            {"microservice": "map", "function": "aggregate", "inputs": {"a": array}}
        ),
        headers={**headers(server), "content-type": "application/msgpack"},
        timeout=30,
    )
    refused(computed, 400, "dtype")
    assert datasets(server) == before
    assert_healthy(server)


def test_timestamps_and_huge_integers_are_400(server: LocalServer) -> None:
    before = datasets(server)
    stamp = msgpack.packb({"a": [msgpack.Timestamp(1, 0)]}, datetime=False)
    refused(upload(server, stamp, format="msgpack"), 400, "extension")
    body = {"microservice": "map", "function": "aggregate", "inputs": {"t": msgpack.Timestamp(1)}}
    computed = requests.post(
        server.url + "/v1/compute",
        data=msgpack.packb(body, datetime=False),
        headers={**headers(server), "content-type": "application/msgpack"},
        timeout=30,
    )
    refused(computed, 400, "extension")
    huge = b'{"a": [1, ' + b"9" * 400 + b"]}"
    refused(upload(server, huge, format="json"), 400, "too large")
    assert datasets(server) == before
    assert_healthy(server)
