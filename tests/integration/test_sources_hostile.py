"""What a reviewer found in sources read in place, each kept from coming back.

Real files, a real PostgreSQL and a real server; each case once gave a 500,
a wrong status, a value in the log, or a silently wrong answer.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from _processes import make_server
from postgres import PostgresDsn

from fdrtd_client import Client, PayloadTooLarge, ServerError
from fdrtd_server.config import TokenStore
from fdrtd_server.errors import ComputationFailed, Conflict
from fdrtd_server.microservice import Dataset
from fdrtd_server.sources import SourceSpec, open_source
from protocols.smpc.service import _UnivariateData


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def csv_source(path: Path, values: list[float]) -> Any:
    path.write_text("x\n" + "\n".join(repr(v) for v in values) + "\n", "utf-8")
    return open_source(SourceSpec.from_dict({"kind": "csv", "path": str(path)}))


def test_sums_that_overflow_are_a_422_on_both_paths(tmp_path: Path) -> None:
    values = [1e60 * i for i in range(1, 31)]
    source = csv_source(tmp_path / "big.csv", values)
    pushed = run(_UnivariateData.of(Dataset({}, count=30, source=source), "x"))
    in_memory = run(_UnivariateData.of(Dataset({"x": np.array(values)}), "x"))
    for data in (pushed, in_memory):
        with pytest.raises(ComputationFailed, match="too large"):
            run(data.power_sums(shift=0.0, scale=None))


def test_rows_appended_between_the_two_passes_are_a_conflict(tmp_path: Path) -> None:
    path = tmp_path / "live.csv"
    source = csv_source(path, [1.0, 2.0, 3.0, 4.0])
    data = run(_UnivariateData.of(Dataset({}, count=4, source=source), "x"))
    csv_source(path, [1.0, 2.0, 3.0, 4.0, 5.0])  # the owner appends meanwhile
    with pytest.raises(Conflict, match="changed while the computation read it"):
        run(data.power_sums(shift=2.5, scale=None))


def test_parquet_columns_no_computation_takes_are_left_out(tmp_path: Path) -> None:
    table = pa.table(
        {
            "x": [1.0, 2.0, 3.0],
            "l": pa.array([[1], [2, 3], []], type=pa.list_(pa.int64())),
            "b": pa.array([b"\xff\xfe", b"a", b"b"], type=pa.binary()),
            "c": pa.array(["a", "b", "a"]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "nested.parquet")
    source = open_source(SourceSpec.from_dict({"kind": "parquet", "path": str(tmp_path)}))
    assert run(source.schema()) == {"x": "float64", "c": "string"}


def test_a_boolean_postgresql_column_is_summed_as_0_and_1(postgres_dsn: PostgresDsn) -> None:
    table = "flags_" + secrets.token_hex(4)
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (b bool)")
        conn.execute(f"INSERT INTO {table} VALUES (true), (false), (true), (NULL)")
        conn.execute(f"GRANT SELECT ON {table} TO PUBLIC")
    try:
        spec = {"kind": "postgresql", "dsn": postgres_dsn.reader, "table": table}
        found = run(open_source(SourceSpec.from_dict(spec)).moments("b", degree=2))
        assert (found.count, found.sums) == (3, (2.0, 2.0))
    finally:
        with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")


def test_a_postgresql_value_never_reaches_the_log(
    postgres_dsn: PostgresDsn, caplog: pytest.LogCaptureFixture
) -> None:
    table = "huge_" + secrets.token_hex(4)
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (x numeric)")
        conn.execute(f"INSERT INTO {table} VALUES (1e310), (1)")
        conn.execute(f"GRANT SELECT ON {table} TO PUBLIC")
    try:
        spec = {"kind": "postgresql", "dsn": postgres_dsn.reader, "table": table}
        with pytest.raises(ComputationFailed):
            run(open_source(SourceSpec.from_dict(spec)).moments("x", degree=2))
        assert "0000000000" not in caplog.text
        assert postgres_dsn.reader not in caplog.text
    finally:
        with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")


def test_an_upload_that_decodes_beyond_max_read_bytes_is_refused(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    owner = TokenStore(server.home).add("clinic", "owner")
    server.start(env={"FDRTD_MAX_READ_BYTES": str(64 * 1024)})
    try:
        with Client(server.url, owner) as clinic:
            zeros = pa.table({"x": np.zeros(100_000)})  # kilobytes stored, 800 kB decoded
            pq.write_table(zeros, tmp_path / "zeros.parquet", compression="zstd")
            handle = clinic.upload(tmp_path / "zeros.parquet")
            with pytest.raises(PayloadTooLarge, match="max_read_bytes"):
                clinic.compute("map", "aggregate", data=handle, column="x").result(60)
            # and a file that only ends like Parquet is not one
            fake = tmp_path / "fake.parquet"
            fake.write_bytes(b"XXXX" + (tmp_path / "zeros.parquet").read_bytes()[4:])
            with pytest.raises(ServerError) as refused:
                clinic.upload(fake)
            assert refused.value.status == 400 and "not a Parquet file" in refused.value.detail
        assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
    finally:
        server.stop()
