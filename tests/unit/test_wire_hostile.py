"""Hostile input to the wire format, the upload parsers and the client: a clear refusal.

numpy evaluates some dtype texts (``"(2,3"`` raised SyntaxError, a huge
sub-array shape ValueError) and accepts platform types (``"g"``, float128);
msgpack decodes its own Timestamp extension without asking our hook; JSON
integers beyond float64 raised OverflowError. Each must now be a
:class:`~fdrtd_client.wire.WireError` or a 4xx error with a sentence.

The client half checks the warning for plain ``http://`` to another machine
and error answers whose body is not a problem document, against a tiny HTTP
server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import fdrtd_client
from fdrtd_client import _client, wire
from fdrtd_client.errors import BadRequest as ClientBadRequest
from fdrtd_client.errors import InsecureTransportWarning, ServerError
from fdrtd_server.errors import BadRequest, PayloadTooLarge
from fdrtd_server.microservice import decode_dataset
from microservices.data._columnar import convert
from microservices.data._parse import (
    MAX_COLUMNS,
    Limits,
    ParseProcess,
    parse,
)

HOSTILE_DTYPES = [
    "(2,3",
    "(99999999999999999999,)f8",
    "(2,)f8",
    "g",
    "f16",
    "float128",
    "longdouble",
    "c16",
    "O",
    "U2",
    "S8",
    "V8",
    "M8[s]",
    "f8,i8",
    "[('a', '<f8')]",
    "<f8 ",
    "i3",
    "",
    "\x00",
    "f" * 10_000,
]


# -- dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE_DTYPES)
def test_hostile_dtype_is_a_wire_error(text: str) -> None:
    with pytest.raises(wire.WireError, match="boolean, integer or float") as caught:
        wire.check_dtype(text)
    assert text not in str(caught.value) or len(text) < 2


@pytest.mark.parametrize("text", HOSTILE_DTYPES)
def test_hostile_dtype_in_an_array_extension_is_refused(text: str) -> None:
    packed = msgpack.packb(
        {"a": msgpack.ExtType(wire.NDARRAY_EXT, msgpack.packb([text, [1], b""]))}
    )
    with pytest.raises(wire.WireError):
        wire.unpackb(packed)
    spec = {"__ndarray__": {"dtype": text, "shape": [1], "base64": "AAAAAAAAAAA="}}
    with pytest.raises(wire.WireError):
        wire.json_loads(json.dumps({"a": spec}).encode())


@pytest.mark.parametrize("text", [1, None, ["<f8"], b"<f8", 3.5])
def test_dtype_that_is_not_text_is_refused(text: object) -> None:
    with pytest.raises(wire.WireError):
        wire.check_dtype(text)


@pytest.mark.parametrize(
    "text",
    [
        *("<f8", ">f8", "=f4", "|b1", "b1", "<i2", ">u8", "|u1", "|i1", "f2"),
        *("bool", "int64", "uint8", "float16", "float32", "float64"),
    ],
)
def test_plain_numeric_dtypes_are_accepted(text: str) -> None:
    dtype = wire.check_dtype(text)
    assert dtype.kind in "biuf" and dtype.itemsize <= 8


def test_every_dtype_the_client_sends_is_accepted() -> None:
    for name in sorted(wire.DTYPE_NAMES):
        array = np.zeros(3, dtype=name)
        little = array.astype(array.dtype.newbyteorder("<"))
        assert wire.check_dtype(little.dtype.str) == little.dtype
        assert np.array_equal(wire.unpackb(wire.packb(array)), array)


# -- msgpack Timestamp and structural limits ---------------------------------------------


@pytest.mark.parametrize(
    "stamp",
    [msgpack.Timestamp(1, 0), msgpack.Timestamp(1, 5), msgpack.Timestamp(2**40, 5)],
    ids=["fixext4", "fixext8", "ext8"],
)
def test_msgpack_timestamp_is_refused_everywhere(stamp: msgpack.Timestamp) -> None:
    for message in (
        stamp,
        [1, stamp],
        {"a": [1.0, stamp]},
        {"inputs": {"deep": [[[stamp]]]}},
    ):
        with pytest.raises(wire.WireError, match="extension"):
            wire.unpackb(msgpack.packb(message, datetime=False))


def test_timestamp_bytes_inside_data_are_not_mistaken_for_one() -> None:
    # the byte marks of a Timestamp inside binary data or a string must not refuse it
    array = np.frombuffer(b"\xd6\xff\xd7\xff\xc7\x0c\xff\x00", dtype=np.uint8)
    message = {"a": array, "b": b"\xd6\xff\x00\x00\x00\x01", "c": "\u00d6\u00ff"}
    decoded = wire.unpackb(wire.packb(message))
    assert np.array_equal(decoded["a"], array) and decoded["b"] == message["b"]


def test_structural_limits_refuse_before_building() -> None:
    packed = msgpack.packb([1, 2, 3])
    with pytest.raises(wire.WireError, match="longer than this server accepts"):
        wire.unpackb(packed, max_array_len=2)
    assert wire.unpackb(packed, max_array_len=3) == [1, 2, 3]
    with pytest.raises(wire.WireError, match="longer than this server accepts"):
        wire.unpackb(msgpack.packb({"a": 1, "b": 2}), max_map_len=1)
    with pytest.raises(wire.WireError, match="longer than this server accepts"):
        wire.unpackb(msgpack.packb("x" * 10), max_str_len=9)


# -- the upload parsers ------------------------------------------------------------------

LIMITS = Limits.for_parse_bytes(1024 * 1024)


@pytest.mark.parametrize(
    ("fmt", "raw", "words"),
    [
        ("json", b'{"a": [1, ' + b"1" + b"0" * 309 + b"]}", "too large"),
        ("json", b'{"a": [' + b"9" * 400 + b", 1]}", "too large"),
        ("json", b'{"a": [' + b"9" * 400 + b", 1.5]}", "too large"),
        ("json", b'{"a": {"__ndarray__": {"dtype": "(2,3", "shape": [1], "base64": ""}}}', "array"),
        ("msgpack", msgpack.packb({"a": [msgpack.Timestamp(1, 0)]}, datetime=False), "extension"),
        ("msgpack", msgpack.packb({"a": [2**64 - 1, 2**63]}), None),
        ("csv", ",".join(f"c{i}" for i in range(MAX_COLUMNS + 1)).encode() + b"\n", "columns"),
        ("csv", b"a,b\n1,2\n3\n", "line 3"),
        ("csv", b"a\n" + b"x" * 200_000 + b"\n", "longer than"),
    ],
)
def test_hostile_table_is_a_clear_400(
    fmt: str, raw: bytes, words: str | None, tmp_path: Path
) -> None:
    if words is None:  # accepted: exact integers beyond int64 become float64
        parsed = parse(fmt, raw, LIMITS)
        assert parsed.description["columns"]["a"]["dtype"] == "<f8"
        return
    with pytest.raises(BadRequest) as caught:
        read(fmt, raw, LIMITS, tmp_path)
    assert words in caught.value.message, caught.value.message


def read(fmt: str, raw: bytes, limits: Limits, folder: Path) -> dict[str, Any]:
    """The description of an upload: csv converted through a file, the others parsed."""
    if fmt != "csv":
        return parse(fmt, raw, limits).description
    (folder / "upload").write_bytes(raw)
    return convert(fmt, folder / "upload", folder / "stored.parquet", limits)


def test_text_column_too_wide_for_numpy_is_refused(tmp_path: Path) -> None:
    # 1,000 records, one of them 20,000 characters: 80 MB as a numpy unicode array
    tight = Limits(1024 * 1024, 64 * 1024 * 1024)
    raw = b"name\n" + b"x\n" * 999 + b"y" * 20_000 + b"\n"
    with pytest.raises(PayloadTooLarge, match="text column 'name'"):
        read("csv", raw, tight, tmp_path)
    document = json.dumps({"name": ["x"] * 999 + ["y" * 20_000]}).encode()
    with pytest.raises(PayloadTooLarge, match="text column 'name'"):
        parse("json", document, tight)


def test_csv_is_converted_into_the_stored_form(tmp_path: Path) -> None:
    description = read("csv", b"a,b,c\n1,x,\n\n2.5,3,4\n", LIMITS, tmp_path)
    assert description == {
        "format": "table",
        "storage": "parquet",
        "columns": {
            "a": {"dtype": "<f8", "shape": [2]},
            "b": {"dtype": "text", "shape": [2]},
            "c": {"dtype": "<f8", "shape": [2]},
        },
        "rows": 2,
    }
    stored = decode_dataset(description, (tmp_path / "stored.parquet").read_bytes()).columns
    assert list(stored["b"]) == ["x", "3"]
    assert np.array_equal(stored["a"], [1.0, 2.5])
    assert np.isnan(stored["c"][0]) and stored["c"][1] == 4.0


def test_parse_child_runs_out_of_memory_not_the_server() -> None:
    """A list of empty lists: ~65x its size as Python objects; the child's cap stops it."""

    async def attempt() -> None:
        count = 6 * 1024 * 1024
        bomb = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count
        small = Limits(8 * 1024 * 1024, 64 * 1024 * 1024)  # the child may take 256 MiB
        # stopped by its memory cap (the message says so), not by its 30 s deadline
        with pytest.raises(PayloadTooLarge, match="more memory"):
            async with ParseProcess("msgpack", small, time.monotonic() + 30) as child:
                await child.start(bomb)

    asyncio.run(attempt())


def test_parse_child_is_stopped_at_its_deadline() -> None:
    async def attempt() -> None:
        slow = b"[" + b"1," * (4 * 1024 * 1024) + b"1]"
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge, match="did not finish in the time allowed"):
            async with ParseProcess("json", Limits.for_parse_bytes(16 << 20), started + 0.3) as c:
                await c.start(slow)

    asyncio.run(attempt())


# -- the client --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_warnings() -> Iterator[None]:
    _client._WARNED.clear()
    yield
    _client._WARNED.clear()


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8000", "http://fdrtd.example.org", "http://[2001:db8::1]:80"]
)
def test_plain_http_to_another_machine_warns_once(url: str) -> None:
    with pytest.warns(InsecureTransportWarning, match="unencrypted") as caught:
        fdrtd_client.Client(url, "t")
        fdrtd_client.connect(url, "t")
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdrtd_client.Client(url, "t")  # once per server and process


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.9.9.9",
        "http://localhost:8000",
        "http://[::1]:8000",
        "http://api.localhost",
        "https://10.1.2.3",
        "https://fdrtd.example.org",
    ],
)
def test_loopback_or_https_does_not_warn(url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdrtd_client.Client(url, "t")


def test_allow_insecure_silences_the_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdrtd_client.Client("http://10.1.2.3", "t", allow_insecure=True)
        fdrtd_client.connect("http://10.1.2.4", "t", allow_insecure=True)


def test_the_warning_can_be_made_an_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureTransportWarning)
        with pytest.raises(InsecureTransportWarning):
            fdrtd_client.Client("http://10.1.2.5", "t")


class _OddErrors(http.server.BaseHTTPRequestHandler):
    """Answers every request with status 400 and the body named by the path."""

    bodies = {
        "/list": (b"[1, 2]", "application/json"),
        "/string": (b'"nope"', "application/problem+json"),
        "/number": (b"7", "application/json"),
        "/null": (b"null", "application/json"),
        "/detail-list": (b'{"detail": ["a"]}', "application/problem+json"),
        "/html": (b"<html>bad</html>", "text/html"),
        "/empty": (b"", "application/json"),
        "/problem": (b'{"detail": "a clear sentence"}', "application/problem+json"),
    }

    def do_GET(self) -> None:
        body, media = self.bodies.get(self.path, (b"{}", "application/json"))
        self.send_response(400, "Bad Request")
        self.send_header("content-type", media)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def odd_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OddErrors)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("path", sorted(set(_OddErrors.bodies) - {"/problem"}))
def test_error_body_that_is_not_a_problem_document(odd_server: str, path: str) -> None:
    client = fdrtd_client.Client(odd_server, "t", timeout=5)
    with client, pytest.raises(ClientBadRequest) as caught:
        client.request("GET", path)
    assert caught.value.status == 400
    assert caught.value.detail == "Bad Request"


def test_error_body_that_is_a_problem_document(odd_server: str) -> None:
    client = fdrtd_client.Client(odd_server, "t", timeout=5)
    with client, pytest.raises(ServerError, match="a clear sentence"):
        client.request("GET", "/problem")


@pytest.mark.parametrize(
    "error", [None, "text", ["x"], {"status": "x"}, {"status": 99, "detail": 5}, {}]
)
def test_failed_job_with_a_malformed_error_still_raises_a_server_error(error: object) -> None:
    job = fdrtd_client.Job(
        fdrtd_client.Client("http://127.0.0.1:9", "t"), fdrtd_client.Handle("r-0")
    )
    with pytest.raises(ServerError) as caught:
        job._outcome({"status": "failed", "error": error}, True)
    assert caught.value.status == 500 and caught.value.detail
