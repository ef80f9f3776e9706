"""Invariant 1: a data handle can never be downloaded, by any endpoint, role or trick.

Two servers of their own (``north`` and ``south``) hold datasets of
distinctive values: four floats such as ``7777.123456``, each in a single
record, hidden among common padding (so that no minimum, maximum, median,
quantile or k-th value is one of them) and, in the table uploads, a text
column with a marker word in one record. South's single records differ from
north's. Then north's data handle is thrown at everything:

* every route of ``/v1/openapi.json`` with every method, the handle in every
  path parameter and in the query, with empty, JSON and msgpack bodies, for
  the owner, the admin, another analyst and nobody;
* path tricks sent verbatim (dot segments, suffixes, encodings, the results
  routes);
* every input name of every function of every microservice that
  ``/v1/microservices`` lists, through ``/v1/compute``; every result is read
  in JSON, in msgpack and as server-sent events;
* every job function again as a north-south session, and two tricks that an
  analyst with an account on a second server could try: a set union, and an
  elementwise secure sum against zeros.

No answer may contain the marker, a value (as text, as a number anywhere in
a JSON or msgpack answer, as little- or big-endian float64 or float32 bytes,
as hex) or the raw array bytes, also not base64-encoded; neither may
``server.log`` nor ``audit.log``. A handle owned by another principal is a
404 exactly like an unknown one, everywhere, and cannot be taken over.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import http.client
import json
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from fdrtd_client import wire
from fdrtd_server.config import TokenStore
from fdrtd_server.local import LocalFederation, LocalServer
from fdrtd_server.microservice import Microservice, discover

DISTINCT = (7777.123456, 6543.210987, 5432.109876, 4321.098765)
MARKER = "Zebraquokka8812"
MSGPACK = "application/msgpack"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
INPUT_NAMES = (
    "data",
    "handle",
    "dataset",
    "data_x",
    "data_y",
    "source",
    "input",
    "inputs",
    "value",
    "values",
    "column",
    "columns",
    "x",
    "y",
    "key",
    "keys",
    "left",
    "right",
    "target",
    "features",
)
UNKNOWN_DATA = "d-" + "0" * 40
SESSION_TIMEOUT = "20"
"""Generous: every session of the federated sweep runs at the same time on two cores."""


SOUTH_DISTINCT = (7654.321987, 6789.123456, 5678.912345, 4567.891234)
"""South's own single-record values: north's never occur on south."""
LAYOUT: tuple[tuple[float | None, int], ...] = (
    (-50000.0, 61),
    (4000.0, 61),
    (None, 3),
    (5000.0, 255),
    (None, 2),
    (6000.0, 255),
    (None, 1),
    (7000.0, 255),
    (None, 0),
    (8000.0, 61),
    (50000.0, 62),
)
"""Blocks of common padding ``(value, count)``; ``(None, i)`` is the i-th single record."""


def distinctive_values(distinct: tuple[float, ...]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """1014 floats: four single-record values, each between blocks of common padding.

    Sorted, the single records sit at positions that no minimum, maximum,
    median, quartile or the ``K``/``PROBABILITIES`` used below land on, so
    that no honest statistic over one or both parties' data equals one.
    """
    blocks = [(distinct[count], 1) if value is None else (value, count) for value, count in LAYOUT]
    values = np.concatenate([np.full(count, value) for value, count in blocks])
    return np.random.default_rng(20240611).permutation(values)


def csv_text(values: np.ndarray[Any, Any], labels: list[str]) -> bytes:
    """The CSV upload: a numeric ``value`` and a text ``label`` column."""
    rows = [f"{float(v)!r},{label}\n" for v, label in zip(values, labels, strict=True)]
    return ("value,label\n" + "".join(rows)).encode()


VALUES = distinctive_values(DISTINCT)
LABELS = ["plain"] * VALUES.size
LABELS[0] = MARKER  # first: a parser error about the column would name it
CSV = csv_text(VALUES, LABELS)
SOUTH_VALUES = distinctive_values(SOUTH_DISTINCT)
SOUTH_LABELS = ["plain"] * VALUES.size
SOUTH_LABELS[99] = "southonly"
K = 500
PROBABILITIES = [0.1, 0.25, 0.5, 0.75, 0.9]
SET_REVEALING = {("psi", "union")}
"""Functions whose result is made of data items; checked on their own below."""


# -- the leak detector ---------------------------------------------------------


class Detector:
    """Finds the marker, the values or the raw bytes in any answer or log."""

    def __init__(self) -> None:
        self.texts = [MARKER.lower().encode()]
        self.patterns: list[tuple[str, bytes]] = []
        for value in DISTINCT:
            self.texts += [repr(value).encode(), f"{value:.2f}".encode()]
            for order in "<>":
                self.patterns.append((f"{value} {order}f8", struct.pack(order + "d", value)))
                self.patterns.append((f"{value} {order}f4", struct.pack(order + "f", value)))
        raw = VALUES.astype("<f8").tobytes()
        self.patterns.append(("raw array bytes", raw[:64]))
        self.hexes = [(name + " as hex", pattern.hex().encode()) for name, pattern in self.patterns]

    def _in_bytes(self, blob: bytes, where: str) -> list[str]:
        found = []
        lower = blob.lower()
        found += [f"{where}: text {text!r}" for text in self.texts if text in lower]
        found += [f"{where}: {name}" for name, pattern in self.patterns if pattern in blob]
        found += [f"{where}: {name}" for name, pattern in self.hexes if pattern in lower]
        return found

    def _numbers(self, obj: Any, where: str) -> list[str]:
        if isinstance(obj, dict):
            return self._numbers([*obj.keys(), *obj.values()], where)
        if isinstance(obj, list | tuple):
            return [found for item in obj for found in self._numbers(item, where)]
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf" and obj.size:
            flat = obj.astype(np.float64).ravel()
            return [
                f"{where}: value {value} in an array"
                for value in DISTINCT
                if np.any(np.abs(flat - value) <= 1e-9 * value)
            ]
        if isinstance(obj, str):
            return self._in_bytes(obj.encode("utf-8", "replace"), where + " (decoded text)")
        if isinstance(obj, bytes):
            return self._in_bytes(obj, where + " (binary field)")
        if isinstance(obj, int | float) and not isinstance(obj, bool):
            return [
                f"{where}: value {value} as a number"
                for value in DISTINCT
                if abs(float(obj) - value) <= 1e-9 * value
            ]
        return []

    def _base64_runs(self, blob: bytes) -> list[bytes]:
        """Every base64 or base64url run in ``blob``, decoded at each of its four alignments."""
        decoded = []
        for run in re.findall(rb"[A-Za-z0-9+/_\-]{12,}={0,2}", blob):
            bare = run.rstrip(b"=")
            for skip in range(4):
                piece = bare[skip:]
                piece = piece[: len(piece) - 1] if len(piece) % 4 == 1 else piece
                piece += b"=" * (-len(piece) % 4)
                for decode in (base64.b64decode, base64.urlsafe_b64decode):
                    with contextlib.suppress(binascii.Error, ValueError):
                        decoded.append(decode(piece))
        return decoded

    def leaks(self, body: bytes, where: str) -> list[str]:
        """Every way ``body`` holds a secret; empty if it holds none."""
        found = self._in_bytes(body, where)
        for decoded in self._base64_runs(body):
            found += [f + " (base64)" for f in self._in_bytes(decoded, where)]
        documents: list[Any] = []
        for text in [body, *re.findall(rb"^data: (.*)$", body, flags=re.M)]:
            with contextlib.suppress(ValueError, RecursionError):
                documents.append(wire.from_jsonable(json.loads(text)))
        with contextlib.suppress(wire.WireError, ValueError):
            documents.append(wire.unpackb(body))
        for document in documents:
            found += self._numbers(document, where)
        return sorted(set(found))


DETECT = Detector()


def test_the_detector_finds_every_form_of_the_data() -> None:
    """The detector itself: each encoding of the data is caught, a clean answer is not."""
    raw = VALUES.astype("<f8").tobytes()
    where = int(np.flatnonzero(DISTINCT[2] == VALUES)[0])
    caught = [
        raw,
        base64.b64encode(raw),
        b"x" + base64.b64encode(raw[8 * where - 13 : 8 * where + 29]),
        raw.hex().encode(),
        json.dumps(wire.to_jsonable({"v": VALUES})).encode(),
        wire.packb({"v": VALUES}),
        wire.packb({"v": [float(v) for v in VALUES[:50]] + [DISTINCT[2]]}),
        wire.packb({"v": np.array([DISTINCT[0]], dtype="<f4")}),
        json.dumps({"v": DISTINCT[0]}).encode(),
        json.dumps({"v": [1.0, DISTINCT[3] * (1 + 1e-12)]}).encode(),
        json.dumps({"detail": f"bad value {DISTINCT[1]:.2f}"}).encode(),
        CSV,
        MARKER.upper().encode(),
        base64.b64encode(b"  " + MARKER.encode()),
        b"event: status\ndata: " + json.dumps({"value": [DISTINCT[1]]}).encode() + b"\n\n",
    ]
    for number, body in enumerate(caught):
        assert DETECT.leaks(body, str(number)), number
    clean = json.dumps(
        {"sum": float(VALUES.sum()), "count": 1014, "minimum": -50000.0, "handle": UNKNOWN_DATA}
    ).encode()
    assert DETECT.leaks(clean, "clean") == []
    assert DETECT.leaks(csv_text(SOUTH_VALUES, SOUTH_LABELS), "south") == []


# -- the servers ---------------------------------------------------------------


@dataclass
class Party:
    """One server with its principals' tokens and the owner's data handles."""

    server: LocalServer
    other: str = ""
    handles: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def auth(self, token: str | None) -> dict[str, str]:
        return {} if token is None else {"authorization": f"Bearer {token}"}


@dataclass
class World:
    north: Party
    south: Party
    federation: LocalFederation


def upload_all(
    url: str, token: str, values: np.ndarray[Any, Any], labels: list[str]
) -> dict[str, str]:
    """Upload ``values`` (and ``labels``) in every format; return the handles by format."""
    bodies = {
        "raw": ({"format": "raw", "dtype": "float64"}, values.astype("<f8").tobytes()),
        "csv": ({"format": "csv"}, csv_text(values, labels)),
        "json": (
            {"format": "json"},
            json.dumps({"value": values.tolist(), "label": labels}).encode(),
        ),
        "msgpack": ({"format": "msgpack"}, wire.packb({"value": values, "label": labels})),
    }
    handles = {}
    for fmt, (params, body) in bodies.items():
        response = requests.post(
            url + "/v1/data",
            params=params,
            data=body,
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text[:300]
        assert DETECT.leaks(response.content, f"upload {fmt}") == []
        handles[fmt] = response.json()["handle"]
    return handles


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, example_plugin: None) -> Iterator[World]:
    # every function is tried, and some are left waiting for a party refused its inputs:
    # the limit of concurrent computations (policy.md) must not be what stops them
    federation = LocalFederation(
        tmp_path_factory.mktemp("nodl"),
        names=("north", "south"),
        policy='version = "nodl"\n[defaults]\nmax_concurrent = 256\n',
    )
    north, south = federation.servers["north"], federation.servers["south"]
    other = TokenStore(north.home).add("other")
    errors: list[BaseException] = []

    def start(server: LocalServer) -> None:
        try:
            server.start(env={"FDRTD_SESSION_TIMEOUT": SESSION_TIMEOUT})
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=start, args=(s,)) for s in (north, south)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        world = World(Party(north, other), Party(south), federation)
        world.north.handles = upload_all(north.url, north.token, VALUES, LABELS)
        world.south.handles = upload_all(south.url, south.token, SOUTH_VALUES, SOUTH_LABELS)
        yield world
    finally:
        federation.stop()


def check(found: list[str]) -> None:
    assert found == [], "\n".join(found[:40])


def fetch(
    session: requests.Session,
    method: str,
    url: str,
    token: str | None,
    where: str,
    found: list[str],
    **kwargs: Any,
) -> requests.Response:
    """One request; every secret in its answer is added to ``found``."""
    kwargs.setdefault("headers", {})
    if token is not None:
        kwargs["headers"]["authorization"] = f"Bearer {token}"
    response = session.request(method, url, timeout=30, allow_redirects=True, **kwargs)
    found += DETECT.leaks(response.content, f"{method} {where} -> {response.status_code}")
    found += DETECT.leaks(
        "\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode(), "headers"
    )
    return response


def aggregate_value(party: Party, handle: str, token: str) -> dict[str, Any]:
    """The result view of ``map.aggregate`` over the ``value`` column of ``handle``."""
    inputs = {"data": handle, "column": "value"}
    response = requests.post(
        party.url + "/v1/compute",
        json={"microservice": "map", "function": "aggregate", "inputs": inputs},
        headers=party.auth(token),
        timeout=30,
    )
    assert response.status_code == 202, response.text[:300]
    view = requests.get(
        f"{party.url}/v1/results/{response.json()['result']}?wait=30",
        headers=party.auth(token),
        timeout=60,
    ).json()
    return dict(view)


# -- every route, every method, every principal --------------------------------


def body_variants(handle: str) -> list[tuple[dict[str, str], bytes | None]]:
    """(headers, body) pairs: no body in three ``Accept`` flavours, a JSON and a msgpack body."""
    message = {
        "handle": handle,
        "data": handle,
        "microservice": "data",
        "function": "describe",
        "inputs": {name: handle for name in INPUT_NAMES},
    }
    return [
        ({"accept": "application/json"}, None),
        ({"accept": MSGPACK}, None),
        ({"accept": "application/octet-stream, text/csv, */*"}, None),
        (
            {"accept": "application/json", "content-type": "application/json"},
            json.dumps(message).encode(),
        ),
        ({"accept": MSGPACK, "content-type": MSGPACK}, wire.packb(message)),
    ]


def test_no_route_returns_the_data(world: World) -> None:
    """Every route x method x principal x body, the handle in the path and the query."""
    north = world.north
    owner, admin = north.server.token, north.server.admin_token
    found: list[str] = []
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        spec = session.get(north.url + "/v1/openapi.json", timeout=30).json()
        paths = sorted(spec["paths"])
        wanted = {"/v1/data", "/v1/data/{handle}", "/v1/results/{handle}", "/v1/compute"}
        assert wanted <= set(paths)
        for fmt in ("raw", "csv"):
            handle = north.handles[fmt]
            query = {name: handle for name in ("handle", "data", "id", "dataset", "download")}
            variants = body_variants(handle)
            for token in (owner, admin, north.other, None):
                for template in paths:
                    path = re.sub(r"\{[^}]+\}", handle, template)
                    for method in METHODS:
                        if token == owner and method == "DELETE" and "{" in template:
                            continue  # releasing is tested on its own below
                        chosen = variants
                        if template == "/v1/microservices" or (fmt == "csv" and token != owner):
                            # /v1/microservices waits 0.25 s for $SRV.INFO answers, and the
                            # strangers' answers for the CSV handle repeat the raw one's
                            chosen = variants[:1] if method in ("GET", "POST") else []
                        for headers, body in chosen:
                            response = fetch(
                                session,
                                method,
                                north.url + path,
                                token,
                                f"{template} {fmt}",
                                found,
                                params=query,
                                headers=dict(headers),
                                data=body,
                            )
                            statuses[response.status_code] = (
                                statuses.get(response.status_code, 0) + 1
                            )
    check(found)
    # the sweep reached real answers, not only refusals
    assert statuses.get(200, 0) >= 50 and statuses.get(401, 0) >= 50, statuses
    # 403: the admin may not touch data routes at all (roles)
    refused = statuses.get(404, 0) + statuses.get(403, 0)
    assert refused >= 20 and statuses.get(405, 0) >= 50, statuses
    assert not any(status >= 500 for status in statuses), statuses


def test_describe_is_schema_only(world: World) -> None:
    north = world.north
    owner = north.server.token
    found: list[str] = []
    with requests.Session() as session:
        for fmt, handle in north.handles.items():
            for accept in ("application/json", MSGPACK):
                response = fetch(
                    session,
                    "GET",
                    f"{north.url}/v1/data/{handle}",
                    north.server.token,
                    f"describe {fmt}",
                    found,
                    headers={"accept": accept},
                )
                assert response.status_code == 200
            described = session.get(
                f"{north.url}/v1/data/{handle}", headers=north.auth(north.server.token), timeout=30
            ).json()
            assert set(described) == {"handle", "format", "columns", "rows", "bytes", "created"}
            assert described["rows"] == VALUES.size
        # one listing may come back short (nats-py's KeyValue.keys() race, nats.py#842)
        listed: set[str] = set()
        for _ in range(3):
            answer = fetch(session, "GET", north.url + "/v1/data", owner, "list", found)
            listed.update(entry["handle"] for entry in answer.json()["datasets"])
        assert listed >= set(north.handles.values())
    check(found)


PATH_TRICKS = (
    "/v1/data/{h}/../{h}",
    "/v1/data/{h}/./",
    "/v1/data/./{h}",
    "/v1/data/{h}/..",
    "/v1/data/{h}/%2e%2e/{h}",
    "/v1/data/{h}%2F..%2F{h}",
    "/v1/data/{h}/content",
    "/v1/data/{h}/download",
    "/v1/data/{h}/raw",
    "/v1/data/{h}/values",
    "/v1/data/{h}.csv",
    "/v1/data/{h}.json",
    "/v1/data/{h}/",
    "/v1//data/{h}",
    "//v1/data/{h}",
    "/v1/data/{h}?download=1&format=csv&raw=true&content=1",
    "/v1/data/{h}%00",
    "/v1/data/{h}%0A",
    "/v1/data/%64-{hex}",
    "/v1/data/{H}",
    "/V1/DATA/{h}",
    "/v1/data?handle={h}&format=csv",
    "/v1/results/{h}",
    "/v1/results/{h}?wait=1",
    "/v1/results/{h}/events",
    "/v1/results/../data/{h}",
    "/v1/results/{h}/../../data/{h}",
    "/v1/compute?data={h}",
    "/v1/peer?data={h}",
    "/v1/microservices/data/{h}",
    "/v1/identity?handle={h}",
)


def raw_request(url: str, method: str, target: str, token: str | None) -> tuple[int, bytes]:
    """Send ``target`` exactly as written (no client-side path normalisation)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        connection.request(method, target, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_path_tricks_return_no_data(world: World) -> None:
    north = world.north
    found: list[str] = []
    statuses: dict[int, int] = {}
    for fmt in ("raw", "csv"):
        handle = north.handles[fmt]
        for trick in PATH_TRICKS:
            target = trick.format(h=handle, H=handle.upper(), hex=handle[2:])
            for token in (north.server.token, north.server.admin_token):
                for method in ("GET", "POST"):
                    status, body = raw_request(north.url, method, target, token)
                    found += DETECT.leaks(body, f"{method} {target} -> {status}")
                    statuses[status] = statuses.get(status, 0) + 1
                    if trick.startswith("/v1/results/{h}"):
                        assert 400 <= status < 500, (target, status)
    check(found)
    assert not any(status >= 500 for status in statuses), statuses


# -- every function of every microservice --------------------------------------


def microservice_functions(party: Party) -> list[tuple[str, str, str]]:
    listing = requests.get(
        party.url + "/v1/microservices", headers=party.auth(party.server.token), timeout=30
    ).json()
    functions = [
        (entry["name"], name, kind)
        for entry in listing["microservices"]
        for name, kind in entry["functions"].items()
    ]
    names = {f"{ms}.{fn}" for ms, fn, _ in functions}
    assert {"data.describe", "map.aggregate", "smpc.secure_sum", "example.rows"} <= names
    return sorted(functions)


def input_sets(handle: str, fmt: str) -> list[dict[str, Any]]:
    sets: list[dict[str, Any]] = [
        {"data": handle},
        {name: handle for name in INPUT_NAMES},
        {"data": handle, "handle": handle, "column": None},
    ]
    for column in ["value", "label"] if fmt == "csv" else ["value"]:
        sets.append({"data": handle, "handle": handle, "column": column, "x": column, "y": column})
    return sets


def finish(
    session: requests.Session, party: Party, token: str, handle: str, where: str, found: list[str]
) -> dict[str, Any]:
    """Wait for a result, reading it in JSON, msgpack and as events; return its view."""
    url = f"{party.url}/v1/results/{handle}"
    deadline = time.monotonic() + 40
    while True:
        view = fetch(session, "GET", url + "?wait=10", token, where, found).json()
        if view["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
    fetch(session, "GET", url, token, where + " msgpack", found, headers={"accept": MSGPACK})
    if view["status"] in ("done", "failed"):  # a running one would stream for a minute
        events = fetch(session, "GET", url + "/events", token, where + " events", found)
        assert events.status_code == 200
    return dict(view)


def test_no_function_returns_the_data(world: World) -> None:
    """Every function of every microservice, the handle in every input, one party."""
    north = world.north
    token = north.server.token
    found: list[str] = []
    views: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    with requests.Session() as session:
        pending: list[tuple[tuple[str, str, str, int], str]] = []
        for microservice, function, kind in microservice_functions(north):
            for fmt in ("raw", "csv"):
                for number, template in enumerate(input_sets(UNKNOWN_DATA, fmt)):
                    # calls act at once (data.release!): they get a fresh copy each
                    handle = upload_copy(north, fmt) if kind == "call" else north.handles[fmt]
                    inputs = {k: handle if v == UNKNOWN_DATA else v for k, v in template.items()}
                    body = {"microservice": microservice, "function": function, "inputs": inputs}
                    media, encoded = (
                        (MSGPACK, wire.packb(body))
                        if number % 2
                        else ("application/json", json.dumps(body).encode())
                    )
                    where = f"{microservice}.{function} {fmt} #{number} {media}"
                    response = fetch(
                        session,
                        "POST",
                        north.url + "/v1/compute",
                        token,
                        where,
                        found,
                        data=encoded,
                        headers={"content-type": media, "accept": media},
                    )
                    assert response.status_code < 500, (where, response.text[:300])
                    if response.status_code == 202:
                        started = (
                            wire.unpackb(response.content) if media == MSGPACK else response.json()
                        )
                        key = (microservice, function, fmt, number)
                        pending.append((key, started["result"]))
        for key, result in pending:
            views[key] = finish(session, north, token, result, " ".join(map(str, key)), found)
    check(found)
    # the data was really computed on: aggregates came back, values did not
    done = views[("map", "aggregate", "raw", 0)]
    assert done["status"] == "done", done
    assert done["value"]["count"] == VALUES.size
    assert done["value"]["sum"] == pytest.approx(float(VALUES.sum()))
    assert views[("example", "rows", "csv", 0)]["value"] == {"rows": VALUES.size}
    server_errors = [
        (key, view["error"])
        for key, view in views.items()
        if view["status"] == "failed" and view["error"]["status"] >= 500
    ]
    assert server_errors == []


def upload_copy(party: Party, fmt: str) -> str:
    params, body = (
        ({"format": "raw", "dtype": "float64"}, VALUES.astype("<f8").tobytes())
        if fmt == "raw"
        else ({"format": "csv"}, CSV)
    )
    response = requests.post(
        party.url + "/v1/data",
        params=params,
        data=body,
        headers=party.auth(party.server.token),
        timeout=30,
    )
    assert response.status_code == 201, response.text[:300]
    handle: str = response.json()["handle"]
    return handle


def federated_inputs(handle: str, fmt: str) -> dict[str, Any]:
    """Inputs that let most protocols run to the end on the ``value`` column."""
    inputs: dict[str, Any] = {
        "data": handle,
        "k": K,
        "probabilities": PROBABILITIES,
        "bins": [-100000.0, 0.0, 100000.0],
    }
    if fmt == "csv":
        inputs.update(column="value", x="value", y="value")
    return inputs


@functools.cache
def _microservices() -> dict[str, Microservice]:
    return discover()


def only_declared(microservice: str, function: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The ``inputs`` that the function declares: it refuses any other (400)."""
    declared = _microservices()[microservice].signatures[function].inputs
    if declared is None:
        return inputs
    names = {item.name for item in declared}
    return {key: value for key, value in inputs.items() if key in names}


def start_federated(
    world: World,
    session: requests.Session,
    microservice: str,
    function: str,
    inputs: dict[str, dict[str, Any]],
    found: list[str],
) -> list[tuple[str, Party, str]]:
    """Start one computation on north and south in one session: (where, party, result)."""
    spec = {"id": f"nodl-{secrets.token_hex(12)}", "parties": ["north", "south"]}
    started = []
    for party in (world.north, world.south):
        name = party.server.name
        body = {
            "microservice": microservice,
            "function": function,
            "inputs": only_declared(microservice, function, inputs[name]),
            "session": spec,
        }
        where = f"{name} {microservice}.{function}"
        response = fetch(
            session, "POST", party.url + "/v1/compute", party.server.token, where, found, json=body
        )
        if response.status_code == 400 and "needs the input" in response.json()["detail"]:
            # refused before it ran: its declaration requires an input not given here
            continue
        assert response.status_code == 202, (where, response.text[:300])
        started.append((where, party, response.json()["result"]))
    return started


def run_federated(
    world: World,
    session: requests.Session,
    microservice: str,
    function: str,
    inputs: dict[str, dict[str, Any]],
    found: list[str],
) -> dict[str, dict[str, Any]]:
    """Run one computation on north and south in one session; their final views by name."""
    started = start_federated(world, session, microservice, function, inputs, found)
    return {
        party.server.name: finish(session, party, party.server.token, result, where, found)
        for where, party, result in started
    }


def test_no_federated_computation_returns_the_data(world: World) -> None:
    """Every job function as a north-south session; south's data shares only the padding.

    All sessions run at once, on the CSV datasets (``value`` column); the
    secure sum also on the raw ones.
    """
    jobs = [(ms, fn) for ms, fn, kind in microservice_functions(world.north) if kind == "job"]
    found: list[str] = []
    runs = [(ms, fn, "csv") for ms, fn in jobs if (ms, fn) not in SET_REVEALING]
    runs.append(("smpc", "secure_sum", "raw"))
    with requests.Session() as session:
        started = {
            (ms, fn, fmt): start_federated(
                world,
                session,
                ms,
                fn,
                {
                    "north": federated_inputs(world.north.handles[fmt], fmt),
                    "south": federated_inputs(world.south.handles[fmt], fmt),
                },
                found,
            )
            for ms, fn, fmt in runs
        }
        views = {
            (run, party.server.name): finish(
                session, party, party.server.token, result, where, found
            )
            for run, parties in started.items()
            for where, party, result in parties
        }
    check(found)
    # the protocols really ran on the data
    for name in ("north", "south"):
        joint = views[("smpc", "secure_sum", "raw"), name]
        assert joint["status"] == "done", joint
        assert joint["value"]["count"] == VALUES.size + SOUTH_VALUES.size
        total = float(VALUES.sum() + SOUTH_VALUES.sum())
        assert joint["value"]["sum"] == pytest.approx(total, abs=1e-3)
        extremes = views[("smpc", "minimum_maximum", "csv"), name]
        assert extremes["status"] == "done", extremes
        assert extremes["value"]["maximum"] == pytest.approx(50000.0, abs=1e-3)
        common = views[("psi", "intersection_size", "csv"), name]
        assert common["status"] == "done", common
        assert common["value"]["size"] == len(LAYOUT) - 4
        # the items themselves need allow_set_intersection, off on north and south
        refused = views[("psi", "intersection", "csv"), name]
        assert refused["status"] == "failed", refused
        assert refused["error"]["status"] == 403, refused
        assert "allow_set_intersection" in refused["error"]["detail"], refused
    server_errors = [
        (key, view["error"])
        for key, view in views.items()
        if view["status"] == "failed" and view["error"]["status"] >= 500
    ]
    assert server_errors == []


def test_union_reveals_no_single_record_item(world: World) -> None:
    """``psi.union`` must not hand out north's single records to a second server's analyst.

    Each of north's distinctive values (and the marker) is held by one record,
    below the minimum cohort of 3; a union would list them. A union discloses
    items by nature, so it runs only where the owner's policy allows it
    (``allow_set_union``, off by default, as on north and south here).
    """
    found: list[str] = []
    with requests.Session() as session:
        for fmt, column in (("raw", None), ("csv", "value"), ("csv", "label")):
            inputs = {
                name: {"data": party.handles[fmt], "column": column}
                for name, party in (("north", world.north), ("south", world.south))
            }
            run_federated(world, session, "psi", "union", inputs, found)
    check(found)


def test_elementwise_sum_with_a_zero_partner_returns_no_data(world: World) -> None:
    """``smpc.secure_sum`` elementwise, with zeros on the other server, must not echo the array.

    With ``elementwise`` the result is north's array plus south's; an analyst
    who also uploads zeros on south gets north's records back one by one.
    """
    zeros = requests.post(
        world.south.url + "/v1/data",
        params={"format": "raw", "dtype": "float64"},
        data=np.zeros(VALUES.size).tobytes(),
        headers=world.south.auth(world.south.server.token),
        timeout=30,
    )
    assert zeros.status_code == 201
    inputs = {
        "north": {"data": world.north.handles["raw"], "elementwise": True},
        "south": {"data": zeros.json()["handle"], "elementwise": True},
    }
    found: list[str] = []
    with requests.Session() as session:
        run_federated(world, session, "smpc", "secure_sum", inputs, found)
    check(found)


def test_matrix_product_with_an_identity_partner_returns_no_data(world: World) -> None:
    """``smpc.matrix_product`` with the identity on south would hand out north's matrix.

    ``I @ A = A``: an analyst who can upload on south reads north's records
    back, one per row. A server holding one of the two matrices takes part
    only where its policy allows matrix products (``allow_matrix_product``,
    off by default, as on north and south here); both refuse, and say why.
    """
    matrix = upload_matrix(world.north, VALUES.reshape(-1, 1))
    identity = upload_matrix(world.south, np.eye(VALUES.size))
    common = {"left": "south", "right": "north"}
    inputs = {"north": {"data": matrix, **common}, "south": {"data": identity, **common}}
    assert_refused_by_policy(world, "matrix_product", inputs, "allow_matrix_product")


def test_vertical_regression_with_indicator_columns_returns_no_data(world: World) -> None:
    """``smpc.linear_regression_vertical`` opens X'X: an indicator column reads a value.

    South's analyst joins north's records on their id and gives, for each of
    north's single records, a column that is 1 on that record only, and
    ``y = 1``: the opened cross block ``value' i_k`` is that record's value,
    and the fit's own coefficients give it too (``v_k = (1 - b_k) / b_value``).
    A server that gives data takes part only where its policy allows
    vertical regressions (``allow_vertical_regression``, off by default, as
    on north and south here); both refuse, and say why.
    """
    ids = [f"r{i}" for i in range(VALUES.size)]
    north = upload_table(world.north, {"id": ids, "value": VALUES})
    columns: dict[str, Any] = {"id": ids, "y": np.ones(VALUES.size)}
    for k, row in enumerate(np.flatnonzero(np.isin(VALUES, DISTINCT)).tolist()):
        columns[f"i{k}"] = np.where(np.arange(VALUES.size) == row, 1.0, 0.0)
    south = upload_table(world.south, columns)
    common = {"target_holder": "south", "intercept": False}
    indicators = [name for name in columns if name.startswith("i")]
    inputs = {
        "north": {"data": north, "id": "id", "x": ["value"], **common},
        "south": {"data": south, "id": "id", "x": indicators, "y": "y", **common},
    }
    assert_refused_by_policy(
        world, "linear_regression_vertical", inputs, "allow_vertical_regression"
    )


def assert_refused_by_policy(
    world: World, function: str, inputs: dict[str, dict[str, Any]], setting: str
) -> None:
    """Both servers refuse ``smpc.<function>`` with 403 naming ``setting``; no data comes back."""
    found: list[str] = []
    with requests.Session() as session:
        views = run_federated(world, session, "smpc", function, inputs, found)
    check(found)
    for name, view in views.items():
        assert view["status"] == "failed", (name, view)
        assert view["error"]["status"] == 403, (name, view)
        assert f"{setting} = true" in view["error"]["detail"], (name, view)


def upload_table(party: Party, columns: dict[str, Any]) -> str:
    """Upload named columns as one msgpack table of ``party``; its handle."""
    response = requests.post(
        party.url + "/v1/data",
        params={"format": "msgpack"},
        data=wire.packb(columns),
        headers={**party.auth(party.server.token), "content-type": MSGPACK},
        timeout=60,
    )
    assert response.status_code == 201, response.text[:300]
    handle: str = response.json()["handle"]
    return handle


def upload_matrix(party: Party, matrix: np.ndarray[Any, Any]) -> str:
    """Upload a 2-D float64 matrix as one raw dataset of ``party``; its handle."""
    response = requests.post(
        party.url + "/v1/data",
        params={
            "format": "raw",
            "dtype": "<f8",
            "shape": ",".join(map(str, matrix.shape)),
        },
        data=matrix.astype("<f8").tobytes(),
        headers=party.auth(party.server.token),
        timeout=60,
    )
    assert response.status_code == 201, response.text[:300]
    handle: str = response.json()["handle"]
    return handle


# -- other principals ----------------------------------------------------------


def refusal(party: Party, token: str, handle: str, kind: str) -> tuple[int, str]:
    """How ``token`` is refused ``handle`` in one way of asking (status, detail)."""
    auth = party.auth(token)
    if kind in ("GET", "DELETE"):
        response = requests.request(kind, f"{party.url}/v1/data/{handle}", headers=auth, timeout=30)
        return response.status_code, str(response.json().get("detail", "answered"))
    microservice, function = kind.split(".")
    inputs = {"handle": handle} if microservice == "data" else {"data": handle, "column": "value"}
    if microservice != "data":  # calls are refused before their inputs are looked at
        inputs = only_declared(microservice, function, inputs)
    response = requests.post(
        party.url + "/v1/compute",
        json={"microservice": microservice, "function": function, "inputs": inputs},
        headers=auth,
        timeout=30,
    )
    if response.status_code != 202:
        return response.status_code, str(response.json().get("detail", "answered"))
    view = requests.get(
        f"{party.url}/v1/results/{response.json()['result']}?wait=30", headers=auth, timeout=60
    ).json()
    if view["status"] != "failed":
        return 200, "computed"
    return view["error"]["status"], view["error"]["detail"]


def test_another_principals_handle_is_404_like_an_unknown_one(world: World) -> None:
    north, south = world.north, world.south
    handle = north.handles["csv"]
    before = requests.get(
        f"{north.url}/v1/data/{handle}", headers=north.auth(north.server.token), timeout=30
    ).json()
    expected = aggregate_value(north, handle, north.server.token)
    assert expected["status"] == "done"
    kinds = ("GET", "DELETE", "map.aggregate", "example.rows")
    # calls (/v1/compute refuses them) and smpc.count without a session (refused
    # before any handle is looked at) answer alike for every handle, but not 404
    refused_alike = ("data.describe", "data.release", "smpc.count")
    strangers = [
        (north, north.other),
        (north, north.server.admin_token),
        (south, south.server.token),
        (south, south.server.admin_token),
    ]
    for party, token in strangers:
        for kind in kinds + refused_alike:
            unknown = refusal(party, token, UNKNOWN_DATA, kind)
            assert 400 <= unknown[0] < 500, (kind, unknown)
            # an admin is refused every data route by its role (403), whatever the handle
            answer = 403 if token == party.server.admin_token else 404
            assert kind in refused_alike or unknown[0] == answer, (kind, unknown)
            assert refusal(party, token, handle, kind) == unknown, kind
        listed = requests.get(party.url + "/v1/data", headers=party.auth(token), timeout=30)
        assert handle not in listed.text
    after = requests.get(
        f"{north.url}/v1/data/{handle}", headers=north.auth(north.server.token), timeout=30
    ).json()
    assert after == before
    again = aggregate_value(north, handle, north.server.token)
    assert again["value"] == expected["value"]


def test_another_principal_cannot_take_over_or_destroy_a_data_handle(world: World) -> None:
    """``data.register``/``data.release`` through /v1/compute with someone else's handle."""
    north = world.north
    handle = upload_copy(north, "raw")
    owner = north.server.token
    before = requests.get(f"{north.url}/v1/data/{handle}", headers=north.auth(owner), timeout=30)
    expected = aggregate_value(north, handle, owner)
    size = VALUES.nbytes
    attempts = [
        ("release", {"handle": handle}),
        ("register", {"handle": handle, "format": "raw", "dtype": "float64", "size": size}),
        ("register", {"handle": handle, "format": "raw", "dtype": "uint8", "size": size}),
        ("register", {"handle": handle, "format": "csv", "size": size}),
        ("register", {"handle": handle, "format": "raw", "size": -1}),
    ]
    found: list[str] = []
    for token in (north.other, north.server.admin_token):
        for function, inputs in attempts:
            response = requests.post(
                north.url + "/v1/compute",
                json={"microservice": "data", "function": function, "inputs": inputs},
                headers=north.auth(token),
                timeout=30,
            )
            found += DETECT.leaks(response.content, f"{function} by a stranger")
            assert 400 <= response.status_code < 500, response.text[:300]
            if token == north.server.admin_token:  # refused every data route by its role
                assert refusal(north, token, handle, "GET")[0] == 403, (function, inputs)
                continue
            assert refusal(north, token, handle, "GET")[0] == 404, (function, inputs)
            assert aggregate_value(north, handle, token)["error"]["status"] == 404
    check(found)
    after = requests.get(f"{north.url}/v1/data/{handle}", headers=north.auth(owner), timeout=30)
    assert after.status_code == 200 and after.json() == before.json()
    assert aggregate_value(north, handle, owner)["value"] == expected["value"]


def test_released_handle_is_gone_without_a_trace(world: World) -> None:
    north = world.north
    owner = north.server.token
    handle = upload_copy(north, "csv")
    found: list[str] = []
    with requests.Session() as session:
        released = fetch(
            session, "DELETE", f"{north.url}/v1/data/{handle}", owner, "release", found
        )
        assert released.status_code == 200
        assert released.json() == {"handle": handle, "released": True}
        for method in ("GET", "DELETE"):
            gone = fetch(session, method, f"{north.url}/v1/data/{handle}", owner, "gone", found)
            assert gone.status_code == 404
    check(found)
    assert refusal(north, owner, handle, "map.aggregate")[0] == 404


def test_hostile_uploads_echo_no_data(world: World) -> None:
    """Refused uploads holding the data say why without repeating what they held."""
    north = world.north
    text = [MARKER, *(repr(v) for v in DISTINCT)]
    bodies = [
        ({"format": "json"}, json.dumps({"a": [*DISTINCT, MARKER]}).encode()),
        ({"format": "json"}, json.dumps({"a": list(DISTINCT), "b": [MARKER]}).encode()),
        ({"format": "json"}, json.dumps({"a": {"x": [MARKER, *DISTINCT]}}).encode()),
        ({"format": "csv"}, ("a,b\n" + ",".join(text) + "\n").encode()),
        ({"format": "csv"}, f"a,b\n{DISTINCT[0]},{MARKER}\n".encode("utf-16")),
        ({"format": "msgpack"}, wire.packb({"a": [*DISTINCT, MARKER]})),
        ({"format": "msgpack"}, wire.packb({"a": list(DISTINCT)}) + MARKER.encode()),
        ({"format": "raw", "dtype": "float64", "shape": "3"}, VALUES[:5].tobytes()),
        ({"format": "raw", "dtype": "object"}, VALUES[:5].tobytes()),
    ]
    found: list[str] = []
    for number, (params, body) in enumerate(bodies):
        response = requests.post(
            north.url + "/v1/data",
            params=params,
            data=body,
            headers=north.auth(north.server.token),
            timeout=30,
        )
        found += DETECT.leaks(response.content, f"hostile upload #{number}")
        # which 4xx is test_bad_input's business; here only what the answer says matters
        assert response.status_code >= 400, response.status_code
    check(found)


# -- last: the logs ------------------------------------------------------------


def test_logs_hold_no_data(world: World) -> None:
    found: list[str] = []
    for party in (world.north, world.south):
        home = party.server.home
        audit = (home / "audit.log").read_bytes()
        assert audit.count(b'"action":"upload"') >= 4
        assert audit.count(b'"action":"compute"') >= 4
        found += DETECT.leaks(audit, f"{party.server.name} audit.log")
        log = home / "server.log"
        assert log.exists()
        found += DETECT.leaks(log.read_bytes(), f"{party.server.name} server.log")
    check(found)
