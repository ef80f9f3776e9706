"""Uploads in the formats users have: pandas DataFrames, Parquet, CSV beyond the parse limit.

Against a real server over real HTTP, whose ``max_parse_bytes`` is set
small (64 KiB) so that "larger than the parse limit" needs no hundreds of
megabytes: a DataFrame keeps its column names and types and computes; a
Parquet file and a pyarrow Table upload; a CSV sixteen times the parse limit
registers and computes (streamed, converted in bounded memory); malformed
CSV, a file that is not Parquet, a Parquet column of dates, text that is not
UTF-8 and a DataFrame column of mixed types each get a clear refusal, and the
server stays healthy with nothing stored. The client imports and uploads
without pandas or pyarrow.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import assert_healthy

from fdrtd_client.errors import FdrtdClientError
from fdrtd_server.local import LocalFederation, LocalServer

PARSE_LIMIT = 64 * 1024
ROWS = 40


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A server that parses at most 64 KiB of json or msgpack in memory."""
    root = tmp_path_factory.mktemp("formats")
    server = LocalFederation(root, names=("formats",)).servers["formats"]
    server.start(env={"FDRTD_MAX_PARSE_BYTES": str(PARSE_LIMIT)})
    try:
        yield server
    finally:
        server.stop()


def headers(server: LocalServer) -> dict[str, str]:
    return {"authorization": f"Bearer {server.token}"}


def post(server: LocalServer, body: Any, fmt: str) -> requests.Response:
    return requests.post(
        server.url + "/v1/data",
        params={"format": fmt},
        data=body,
        headers=headers(server),
        timeout=60,
    )


def handles(server: LocalServer) -> set[str]:
    answer = requests.get(server.url + "/v1/data", headers=headers(server), timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    return {entry["handle"] for entry in answer.json()["datasets"]}


def aggregate(server: LocalServer, handle: str, column: str) -> dict[str, Any]:
    with server.client() as client:
        result: dict[str, Any] = client.compute(
            "map", "aggregate", data=handle, column=column
        ).result(60)
    return result


def refused(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json")
    detail: str = response.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    return detail


def frame() -> pd.DataFrame:
    ages = np.arange(20, 20 + ROWS, dtype=np.int32)
    return pd.DataFrame(
        {
            "age": ages,
            "weight": np.where(ages % 7 == 0, np.nan, ages * 1.5),
            "smoker": ages % 3 == 0,
            "city": [f"city {i % 4} \u00e9" for i in range(ROWS)],
            "site": pd.Categorical([("north", "south")[i % 2] for i in range(ROWS)]),
            "visits": pd.array([None if i == 5 else i for i in range(ROWS)], dtype="Int64"),
        }
    )


# -- pandas and pyarrow tables --------------------------------------------------------


def test_dataframe_keeps_names_and_types_and_computes(tight: LocalServer) -> None:
    df = frame()
    with tight.client() as client:
        handle = client.upload(df)
        described = client.describe(handle)
    assert described["rows"] == ROWS
    dtypes = {name: column["dtype"] for name, column in described["columns"].items()}
    assert dtypes == {
        "age": "<i4",
        "weight": "<f8",
        "smoker": "|b1",
        "city": "text",
        "site": "text",
        "visits": "<f8",  # a nullable integer column with a missing value: NaN
    }
    assert list(described["columns"]) == list(df.columns)
    age = aggregate(tight, handle, "age")
    assert age["count"] == ROWS and age["sum"] == int(df["age"].sum())
    weight = aggregate(tight, handle, "weight")
    assert weight["count"] == int(df["weight"].notna().sum())
    assert weight["sum"] == pytest.approx(float(df["weight"].sum()))
    visits = aggregate(tight, handle, "visits")
    assert visits["count"] == ROWS - 1 and visits["sum"] == sum(range(ROWS)) - 5


def test_pyarrow_table_and_parquet_file_upload(tight: LocalServer, tmp_path: Path) -> None:
    values = np.linspace(-3.0, 9.0, 5000)
    table = pa.table(
        {
            "x": values,
            "n": pa.array(np.arange(5000), pa.int64()),
            "label": pa.array(["a", "b"] * 2500).dictionary_encode(),
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=777)
    with tight.client() as client:
        from_table = client.upload(table)
        from_file = client.upload(path)
        for handle in (from_table, from_file):
            described = client.describe(handle)
            assert described["rows"] == 5000
            dtypes = {name: column["dtype"] for name, column in described["columns"].items()}
            assert dtypes == {"x": "<f8", "n": "<i8", "label": "text"}
            assert aggregate(tight, handle, "x")["sum"] == pytest.approx(values.sum())
            assert aggregate(tight, handle, "n")["sum"] == 5000 * 4999 // 2


# -- csv beyond the parse limit ------------------------------------------------------


def test_csv_many_times_the_parse_limit_registers_and_computes(
    tight: LocalServer, tmp_path: Path
) -> None:
    rows = 80_000  # about 1.3 MiB: over 16 times the parse limit
    path = tmp_path / "big.csv"
    lines = [f"{i * 0.5},{i % 10},site {i % 3}\n" for i in range(rows)]
    path.write_text("value, group ,site\n" + "".join(lines), "utf-8")
    assert path.stat().st_size > 16 * PARSE_LIMIT
    with tight.client() as client:
        handle = client.upload(path)
        described = client.describe(handle)
    assert described["rows"] == rows
    assert described["format"] == "table"
    dtypes = {name: column["dtype"] for name, column in described["columns"].items()}
    assert dtypes == {"value": "<f8", "group": "<f8", "site": "text"}
    assert aggregate(tight, handle, "value")["sum"] == pytest.approx(0.5 * rows * (rows - 1) / 2)
    # json and msgpack are still parsed in memory, and limited
    big_json = b"[" + b"1," * PARSE_LIMIT + b"1]"
    refused(post(tight, big_json, "json"), 413, "max_parse_bytes")
    assert_healthy(tight)


def test_csv_column_found_to_be_text_late_is_text(tight: LocalServer) -> None:
    """A column of numbers for a million records, then one word: text (a second pass)."""
    body = b"a,b\n" + b"1.5,2\n" * 1_000_000 + b"many,3\n"
    response = post(tight, body, "csv")
    assert response.status_code == 201, response.text[:300]
    described = response.json()
    assert described["rows"] == 1_000_001
    assert described["columns"]["a"]["dtype"] == "text"
    assert described["columns"]["b"]["dtype"] == "<f8"
    assert aggregate(tight, described["handle"], "b")["sum"] == 2 * 1_000_000 + 3


# -- refusals -------------------------------------------------------------------------


def test_malformed_uploads_get_a_clear_4xx_and_nothing_is_stored(
    tight: LocalServer, tmp_path: Path
) -> None:
    before = handles(tight)
    # small (converted in a thread) and large (in a child process) alike
    refused(post(tight, b"a,b\n1,2\n3\n", "csv"), 400, "line 3", "fields")
    deep = b"a,b\n" + b"1,2\n" * 200_000 + b"1,2,3\n"
    refused(post(tight, deep, "csv"), 400, "line 200002", "3 fields")
    refused(post(tight, b"a,b\n" + b"1,2\n" * 100_000 + b"\xff,2\n", "csv"), 400, "column 'a'")
    refused(post(tight, b"", "csv"), 400, "header row")
    not_parquet = b"PAR1" + b"\x00" * 300_000 + b"PAR1"
    refused(post(tight, not_parquet, "parquet"), 400, "not a Parquet file")
    refused(post(tight, b"a,b\n1,2\n", "parquet"), 400, "not a Parquet file")
    dated = tmp_path / "dated.parquet"
    pq.write_table(pa.table({"when": pa.array([1, 2], pa.timestamp("s"))}), dated)
    refused(post(tight, dated.read_bytes(), "parquet"), 400, "column 'when'", "timestamp")
    # text that is not UTF-8 (a lone surrogate written as bytes), labelled as text
    raw = pa.array([b"\xed\xa0\x80", b"ok"], pa.binary())
    lone = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    surrogate = tmp_path / "surrogate.parquet"
    pq.write_table(pa.table({"name": lone}), surrogate)
    refused(post(tight, surrogate.read_bytes(), "parquet"), 400, "column 'name'", "UTF-8")
    mixed = pd.DataFrame({"ok": [1.0, 2.0, 3.0], "mixed": [1, "two", 3.0]})
    with tight.client() as client, pytest.raises(FdrtdClientError, match="column 'mixed'"):
        client.upload(mixed)
    assert handles(tight) == before
    assert_healthy(tight)


# -- the client without pandas or pyarrow --------------------------------------------

WITHOUT = """
import sys
for name in sys.argv[3].split(","):
    sys.modules[name] = None  # import fails, as if not installed
import numpy as np
import fdrtd_client
assert all(sys.modules.get(name) is None for name in ("pandas", "pyarrow"))  # none imported
client = fdrtd_client.Client(sys.argv[1], sys.argv[2])
print(client.describe(client.upload(np.arange(12.0)))["rows"])
if sys.argv[3] == "pyarrow":
    import pandas as pd
    frame = pd.DataFrame({"n": np.arange(12, dtype=np.int16), "t": ["x"] * 12})
    print(client.describe(client.upload(frame))["columns"]["n"]["dtype"])
"""


@pytest.mark.parametrize("missing", ["pandas,pyarrow", "pyarrow"])
def test_client_works_without_pandas_or_pyarrow(tight: LocalServer, missing: str) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", WITHOUT, tight.url, tight.token, missing],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    printed = ran.stdout.split()
    assert printed[0] == "12"
    if missing == "pyarrow":  # a DataFrame then travels as a msgpack table, still typed
        assert printed[1] == "<i2"
