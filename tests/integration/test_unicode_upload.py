"""Text that is not valid Unicode is a 400 naming the problem, never a 500.

JSON allows ``"\\ud800"``: a lone UTF-16 surrogate, which Python decodes into
a one-character string that no UTF-8 encoder accepts, so registering it
failed deep in msgpack with a ``UnicodeEncodeError`` (a 500). ``json.loads``
of bytes lets the same surrogate through written as raw bytes (``ED A0 80``).
CSV and msgpack decode strictly and refuse them, but each format must say so
in words. Every case goes over real HTTP to alpha of the session's trio,
small uploads (parsed in a thread) and large ones (parsed in a child
process); afterwards the server answers, nothing was stored, and a dataset
uploaded before computes the same.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest
import requests
from conftest import assert_healthy

from fdrtd_client import wire
from fdrtd_server.local import LocalServer

LONE = "\ud800"
ESCAPED = "\\ud800"
NOT_UNICODE = "not valid Unicode"
PAD = 300 * 1024
"""Longer than the inline parse limit (256 KiB): such uploads are parsed in a child process."""


def listed(api: requests.Session, server: LocalServer) -> set[str]:
    """The handles of the analyst's datasets (the union of three listings, see test_bad_input)."""
    found: set[str] = set()
    for _ in range(3):
        answer = api.get(server.url + "/v1/data", timeout=30)
        assert answer.status_code == 200
        found.update(entry["handle"] for entry in answer.json()["datasets"])
    return found


def refused(response: requests.Response, *words: str) -> None:
    """A 400 problem document whose detail holds ``words`` and no surrogate, raw or escaped."""
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json")
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    for echo in (LONE, ESCAPED, ESCAPED.upper(), "\\ud", "udfff"):
        assert echo not in detail and echo not in response.text, detail


def total(server: LocalServer, handle: str) -> float:
    """The sum ``map.aggregate`` computes over ``handle``."""
    with server.client() as client:
        return float(client.compute("map", "aggregate", data=handle).result(30)["sum"])


@pytest.fixture(scope="module")
def kept(server: LocalServer) -> str:
    """A dataset uploaded before any bad upload."""
    with server.client() as client:
        return client.upload(np.array([1.5, 2.5, 4.0]))


@pytest.fixture(autouse=True)
def _nothing_stored(api: requests.Session, server: LocalServer, kept: str) -> Any:
    before = listed(api, server)
    yield
    assert_healthy(server)
    assert listed(api, server) == before
    assert total(server, kept) == 8.0


def _json(text: str, pad: int = 0) -> bytes:
    """``text`` (JSON with escapes) with a text column of ``pad`` more bytes before it.

    The columns are checked in order, so the bad one is refused before their
    lengths (which differ) are compared.
    """
    if not pad:
        return text.encode()
    filler = json.dumps(["y" * 1000] * (pad // 1000 + 1))
    return ('{"pad":' + filler + "," + text[1:]).encode()


@pytest.mark.parametrize("pad", [0, PAD], ids=["inline", "child"])
@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('{"x":["\\ud800","a"]}', ("column 'x'", NOT_UNICODE)),
        ('{"x":["a","b\\udfffc"]}', ("column 'x'", NOT_UNICODE)),
        ('{"x":["\\ude00\\ud83d"]}', ("column 'x'", NOT_UNICODE)),  # a pair, reversed
        ('{"\\ud800":[1,2,3]}', ("a column name", NOT_UNICODE)),
        ('{"a\\ud800b":["x","y","z"]}', ("a column name", NOT_UNICODE)),
    ],
    ids=["value", "value-low", "pair-reversed", "name", "name-inside"],
)
def test_json_with_a_lone_surrogate_is_400(
    api: requests.Session, server: LocalServer, body: str, words: tuple[str, ...], pad: int
) -> None:
    data = _json(body, pad)
    assert len(data) > PAD if pad else len(data) < 1024
    refused(api.post(server.url + "/v1/data?format=json", data=data, timeout=60), *words)


def test_a_json_list_with_a_lone_surrogate_is_400(
    api: requests.Session, server: LocalServer
) -> None:
    answer = api.post(server.url + "/v1/data?format=json", data=b'["\\udfff"]', timeout=30)
    refused(answer, "column 'value'", NOT_UNICODE)


def test_json_with_surrogate_bytes_or_invalid_utf8_is_400(
    api: requests.Session, server: LocalServer
) -> None:
    # json.loads decodes bytes with "surrogatepass": raw ED A0 80 becomes a lone surrogate
    surrogate_bytes = b'{"x":["\xed\xa0\x80"]}'
    answer = api.post(server.url + "/v1/data?format=json", data=surrogate_bytes, timeout=30)
    refused(answer, "column 'x'", NOT_UNICODE)
    invalid = api.post(server.url + "/v1/data?format=json", data=b'{"x":["\xff"]}', timeout=30)
    refused(invalid, "not UTF-8 text")


@pytest.mark.parametrize(
    "body",
    [b"a,b\n\xed\xa0\x80,1\n", b"a,\xed\xa0\x80\n1,2\n", b"a,b\n1,\xff\n"],
    ids=["value", "name", "invalid"],
)
def test_csv_that_is_not_utf8_is_400(
    api: requests.Session, server: LocalServer, body: bytes
) -> None:
    refused(api.post(server.url + "/v1/data?format=csv", data=body, timeout=30), "not UTF-8")


@pytest.mark.parametrize(
    "body",
    [
        b"\x81\xa1x\x91\xa3\xed\xa0\x80",  # {"x": [<surrogate as UTF-8 bytes>]}
        b"\x81\xa3\xed\xa0\x80\x91\x01",  # {<surrogate>: [1]}
        b"\x81\xa1x\x91\xa1\xff",  # {"x": [<invalid UTF-8>]}
    ],
    ids=["value", "name", "invalid"],
)
def test_msgpack_strings_that_are_not_utf8_are_400(
    api: requests.Session, server: LocalServer, body: bytes
) -> None:
    answer = api.post(server.url + "/v1/data?format=msgpack", data=body, timeout=30)
    refused(answer, "not valid UTF-8")


def test_compute_bodies_with_text_that_is_not_unicode_are_400(
    api: requests.Session, server: LocalServer
) -> None:
    packed = msgpack.packb({"microservice": "map", "function": "aggregate", "inputs": {}})
    invalid = packed.replace(b"\xa9aggregate", b"\xa9aggregat\xff")
    assert invalid != packed
    answer = api.post(
        server.url + "/v1/compute",
        data=invalid,
        headers={"content-type": "application/msgpack"},
        timeout=30,
    )
    refused(answer, "not valid UTF-8")
    lone = b'{"microservice":"map","function":"aggregate","inputs":{"data":"\\ud800"}}'
    answer = api.post(
        server.url + "/v1/compute",
        data=lone,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    refused(answer, NOT_UNICODE)


def test_valid_surrogate_pairs_and_non_ascii_text_are_accepted(
    api: requests.Session, server: LocalServer
) -> None:
    document = {"\u00e9tat": ["\U0001f600", "caf\u00e9"], "n": [1.0, 2.0]}
    for data in (json.dumps(document).encode(), wire.packb(document)):
        fmt = "json" if data.startswith(b"{") else "msgpack"
        answer = api.post(f"{server.url}/v1/data?format={fmt}", data=data, timeout=30)
        assert answer.status_code == 201, answer.text[:300]
        assert set(answer.json()["columns"]) == {"\u00e9tat", "n"}
        assert api.delete(f"{server.url}/v1/data/{answer.json()['handle']}", timeout=30).ok
