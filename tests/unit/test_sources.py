"""Sources read in place: real CSV, Parquet, directories of them and SQLite files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from fdrtd_server.errors import (
    BadRequest,
    ComputationFailed,
    FdrtdError,
    PayloadTooLarge,
    SourceUnavailable,
)
from fdrtd_server.sources import (
    Source,
    SourceSpec,
    Version,
    check_query,
    choose_version,
    open_source,
)

BIG = 1 << 30


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def table(start: int, rows: int) -> pa.Table:
    ids = np.arange(start, start + rows, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "x": ids * 0.5,
            "flag": ids % 2 == 0,
            "city": pa.array([f"c{i % 3}" for i in ids]),
        }
    )


def write(kind: str, path: Path, data: pa.Table) -> Path:
    if kind == "csv":
        pa_csv.write_csv(data, path)
    else:
        pq.write_table(data, path)
    return path


def source(kind: str, path: Path, **extra: Any) -> Source:
    return open_source(SourceSpec.from_dict({"kind": kind, "path": str(path), **extra}))


# Specs -------------------------------------------------------------------------------------


def test_spec_round_trips_and_public_hides_locations() -> None:
    spec = SourceSpec.from_dict(
        {
            "kind": "postgresql",
            "dsn": "host=db password=secret",
            "table": "clinic.visits",
            "order_by": "added",
            "hold_back": 50,
            "columns": ["age", "weight"],
        }
    )
    assert SourceSpec.from_dict(spec.to_dict()) == spec
    assert spec.public() == {"kind": "postgresql", "hold_back": 50}
    assert "secret" not in repr(spec)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"kind": "excel", "path": "a"}, "source.kind"),
        ({"kind": "csv"}, "source.path"),
        ({"kind": "csv", "path": "a", "table": "t"}, "source.table"),
        ({"kind": "csv", "path": "a", "colour": 1}, "colour"),
        ({"kind": "sqlite", "path": "a"}, "table and query"),
        ({"kind": "sqlite", "path": "a", "table": "t", "query": "SELECT 1"}, "table and query"),
        ({"kind": "sqlite", "path": "a", "table": 't"; DROP TABLE t; --'}, "source.table"),
        ({"kind": "sqlite", "path": "a", "table": "s.t"}, "source.table"),
        ({"kind": "postgresql", "table": "a.b.c", "dsn": "x"}, "source.table"),
        ({"kind": "postgresql", "table": "t"}, "dsn"),
        ({"kind": "postgresql", "table": "t", "dsn_env": "A B"}, "source.dsn_env"),
        ({"kind": "sqlite", "path": "a", "query": "DELETE FROM t"}, "source.query"),
        ({"kind": "sqlite", "path": "a", "query": "SELECT 1; DROP TABLE t"}, "source.query"),
        ({"kind": "sqlite", "path": "a", "table": "t", "hold_back": 5}, "source.order_by"),
        ({"kind": "csv", "path": "a", "hold_back": -1}, "source.hold_back"),
        ({"kind": "csv", "path": "a", "hold_back": True}, "source.hold_back"),
        ({"kind": "csv", "path": "a", "columns": "x"}, "source.columns"),
        ({"kind": "csv", "path": "a", "columns": ["x", "x"]}, "source.columns"),
        ({"kind": "csv", "path": "a", "columns": ["x\ny"]}, "source.columns[0]"),
        ({"kind": "csv", "path": "a", "order_by": ""}, None),
    ],
)
def test_spec_refusals_name_the_key(data: dict[str, Any], named: str | None) -> None:
    if named is None:
        SourceSpec.from_dict(data)
        return
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        SourceSpec.from_dict(data)


def test_queries_must_be_one_select() -> None:
    assert check_query(" select a from t ; ") == "select a from t"
    assert check_query("WITH q AS (SELECT 1) SELECT * FROM q").startswith("WITH")
    for bad in ("", "UPDATE t SET a = 1", "SELECT 1; SELECT 2", "PRAGMA x", "VACUUM"):
        with pytest.raises(ValueError):
            check_query(bad)


def test_version_round_trips() -> None:
    version = Version("a" * 64, 3, "2026-12-07T10:00:00Z")
    assert Version.from_dict(version.to_dict()) == version
    with pytest.raises(ValueError, match="id"):
        Version.from_dict({"id": "../x", "rows": 1, "time": "t"})


# Hold-back ---------------------------------------------------------------------------------


def test_choose_version_holds_back_until_enough_rows() -> None:
    released = Version("a" * 64, 100, "t0")
    same = Version("a" * 64, 100, "t1")
    few = Version("b" * 64, 149, "t2")
    enough = Version("c" * 64, 150, "t3")
    shrunk = Version("d" * 64, 90, "t4")
    changed = Version("e" * 64, 100, "t5")
    assert choose_version(released, None, 50) == (released, True)
    assert choose_version(same, released, 50) == (released, False)
    assert choose_version(few, released, 50) == (released, False)
    assert choose_version(enough, released, 50) == (enough, True)
    assert choose_version(shrunk, released, 50) == (shrunk, True)
    assert choose_version(changed, released, 50) == (changed, True)
    assert choose_version(few, released, 0) == (few, True)


# Files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_file_schema_read_and_version(tmp_path: Path, kind: str) -> None:
    path = write(kind, tmp_path / f"data.{kind}", table(0, 1000))
    src = source(kind, path)
    assert run(src.schema()) == {"id": "int64", "x": "float64", "flag": "bool", "city": "string"}
    got = run(src.read(None, max_bytes=BIG))
    assert got["id"].dtype == np.int64 and got["x"].dtype == np.float64
    assert got["flag"].dtype == bool and got["city"].dtype.kind == "U"
    np.testing.assert_array_equal(got["id"], np.arange(1000))
    np.testing.assert_array_equal(got["city"][:4], ["c0", "c1", "c2", "c0"])
    first = run(src.read(["x"], 10, max_bytes=BIG))
    assert list(first) == ["x"]
    np.testing.assert_array_equal(first["x"], np.arange(10) * 0.5)
    version = run(src.observe())
    assert version.rows == 1000 and len(version.id) == 64
    assert run(src.observe()).id == version.id
    sums = run(src.moments("x", degree=4))
    assert sums.count == 1000 and sums.sums[0] == pytest.approx((np.arange(1000) * 0.5).sum())
    assert (sums.minimum, sums.maximum) == (0.0, 499.5)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_directory_reads_files_in_name_order_and_appends(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write(kind, folder / f"b.{kind}", table(100, 100))
    write(kind, folder / f"a.{kind}", table(0, 100))
    (folder / "notes.txt").write_text("ignored")
    write(kind, folder / f".hidden.{kind}", table(500, 5))
    src = source(kind, folder, hold_back=50)
    np.testing.assert_array_equal(run(src.read(["id"], max_bytes=BIG))["id"], np.arange(200))
    released = run(src.observe())
    assert released.rows == 200

    # Appending below the threshold keeps the released version and its rows.
    write(kind, folder / f"c.{kind}", table(200, 30))
    few = run(src.observe())
    assert few.rows == 230 and few.id != released.id
    use, new = choose_version(few, released, 50)
    assert (use, new) == (released, False)
    held = run(src.read(["id"], use.rows, max_bytes=BIG))["id"]
    np.testing.assert_array_equal(held, np.arange(200))

    # Above it the new rows are released.
    write(kind, folder / f"d.{kind}", table(230, 30))
    enough = run(src.observe())
    assert choose_version(enough, released, 50) == (enough, True)
    everything = run(src.read(["id"], enough.rows, max_bytes=BIG))["id"]
    np.testing.assert_array_equal(everything, np.arange(260))


def test_file_version_follows_content(tmp_path: Path) -> None:
    path = write("parquet", tmp_path / "d.parquet", table(0, 10))
    src = source("parquet", path)
    before = run(src.observe())
    write("parquet", path, table(1, 10))
    os.utime(path, ns=(1, 1))  # a changed file with an old time is still seen by its size/inode
    after = run(src.observe())
    assert after.id != before.id


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_read_over_max_bytes_is_refused(tmp_path: Path, kind: str) -> None:
    path = write(kind, tmp_path / f"d.{kind}", table(0, 200_000))
    src = source(kind, path)
    with pytest.raises(PayloadTooLarge, match="max_bytes=100000"):
        run(src.read(["x"], max_bytes=100_000))
    # The refusal comes as soon as the batches exceed the bound, not after the whole read.
    assert len(run(src.read(["x"], max_bytes=200_000 * 8))["x"]) == 200_000


def test_unknown_column_is_a_bad_request(tmp_path: Path) -> None:
    src = source("csv", write("csv", tmp_path / "d.csv", table(0, 5)))
    with pytest.raises(BadRequest, match="'nope'"):
        run(src.read(["x", "nope"], max_bytes=BIG))
    with pytest.raises(BadRequest, match="text"):
        run(src.moments("city", degree=4))


def test_exposed_columns_only(tmp_path: Path) -> None:
    src = source("parquet", write("parquet", tmp_path / "d.parquet", table(0, 5)), columns=["x"])
    assert run(src.schema()) == {"x": "float64"}
    with pytest.raises(BadRequest, match="'id'"):
        run(src.read(["id"], max_bytes=BIG))
    hidden = source("parquet", tmp_path / "d.parquet", columns=["secret"])
    with pytest.raises(ComputationFailed, match="'secret'"):
        run(hidden.schema())


def test_csv_nulls_and_wrong_types(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n1,2.5,x\n,3.5,\n3,,z\n")
    got = run(source("csv", path).read(None, max_bytes=BIG))
    np.testing.assert_array_equal(got["a"], [1.0, np.nan, 3.0])  # int with a NULL: float NaN
    np.testing.assert_array_equal(got["b"], [2.5, 3.5, np.nan])
    np.testing.assert_array_equal(got["c"], ["x", "", "z"])

    wrong = tmp_path / "wrong.csv"
    rows = "".join(f"{i},{i}\n" for i in range(100_000))
    wrong.write_text("a,b\n" + rows + "7,private-value\n")
    with pytest.raises(ComputationFailed, match="column 'b'") as caught:
        run(source("csv", wrong).read(["b"], max_bytes=BIG))
    assert "private-value" not in str(caught.value)


def test_malformed_csv_is_422_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n3,4,secret-extra\n")
    with pytest.raises(ComputationFailed, match="malformed") as caught:
        run(source("csv", path).read(None, max_bytes=BIG))
    assert "secret" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ComputationFailed, match="not a valid Parquet"):
        run(source("parquet", garbage).schema())


@pytest.mark.parametrize("kind", ["csv", "parquet", "sqlite"])
def test_missing_file_is_unavailable_without_the_path(tmp_path: Path, kind: str) -> None:
    extra = {"table": "t"} if kind == "sqlite" else {}
    src = source(kind, tmp_path / "gone" / f"x.{kind}", **extra)
    for call in (src.schema(), src.observe(), src.read(None, max_bytes=BIG)):
        with pytest.raises(SourceUnavailable) as caught:
            run(call)
        assert caught.value.status == 424 and str(tmp_path) not in str(caught.value)


def test_unreadable_file_is_unavailable(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = write("csv", tmp_path / "d.csv", table(0, 5))
    path.chmod(0)
    with pytest.raises(SourceUnavailable):
        run(source("csv", path).schema())


def test_directory_symlink_out_is_refused(tmp_path: Path) -> None:
    outside = write("csv", tmp_path / "secret.csv", table(0, 5))
    folder = tmp_path / "parts"
    folder.mkdir()
    write("csv", folder / "a.csv", table(0, 5))
    (folder / "b.csv").symlink_to(outside)
    with pytest.raises(SourceUnavailable, match="links outside"):
        run(source("csv", folder).read(None, max_bytes=BIG))
    (folder / "b.csv").unlink()
    (folder / "c.csv").symlink_to(folder / "a.csv")  # a link inside the directory is fine
    assert len(run(source("csv", folder).read(["id"], max_bytes=BIG))["id"]) == 10


def test_traversal_names_are_only_files_of_the_directory(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    (folder / "sub.csv").mkdir(parents=True)  # a directory named like a file is skipped
    write("csv", folder / "a.csv", table(0, 3))
    write("csv", tmp_path / "outside.csv", table(0, 99))
    src = source("csv", folder / ".." / "parts")
    assert len(run(src.read(["id"], max_bytes=BIG))["id"]) == 3


def test_errors_are_fdrtd_errors_with_a_4xx_status(tmp_path: Path) -> None:
    with pytest.raises(FdrtdError) as caught:
        run(source("csv", tmp_path / "none.csv").schema())
    assert 400 <= caught.value.status < 500


# SQLite ------------------------------------------------------------------------------------


def make_sqlite(path: Path, rows: int, start: int = 0) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            'CREATE TABLE IF NOT EXISTS "visits" (id INTEGER, age REAL, ok BOOLEAN, city TEXT)'
        )
        conn.executemany(
            "INSERT INTO visits VALUES (?, ?, ?, ?)",
            [
                (i, None if i % 10 == 9 else 20 + i, i % 2, f"c{i % 3}")
                for i in range(start, start + rows)
            ],
        )
    conn.close()


def test_sqlite_table_and_query(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    make_sqlite(path, 50)
    src = source("sqlite", path, table="visits", order_by="id")
    assert run(src.schema()) == {"id": "int64", "age": "float64", "ok": "bool", "city": "string"}
    got = run(src.read(None, max_bytes=BIG))
    np.testing.assert_array_equal(got["id"], np.arange(50))
    assert np.isnan(got["age"][9]) and got["age"][0] == 20.0
    assert got["city"][4] == "c1"
    sums = run(src.moments("age", degree=4))
    ages = np.array([20.0 + i for i in range(50) if i % 10 != 9])
    assert sums.count == len(ages) and sums.sums[1] == pytest.approx((ages**2).sum())
    assert (sums.minimum, sums.maximum) == (20.0, 68.0)

    query = source("sqlite", path, query="SELECT id, age * 2 AS double_age FROM visits WHERE ok")
    assert run(query.schema()) == {"id": "int64", "double_age": "float64"}
    assert len(run(query.read(["id"], max_bytes=BIG))["id"]) == 25


def test_sqlite_hold_back_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    make_sqlite(path, 100)
    src = source("sqlite", path, table="visits", order_by="id", hold_back=20)
    released = run(src.observe())
    assert released.rows == 100
    assert run(source("sqlite", path, table="visits", order_by="id").observe()).id == released.id
    make_sqlite(path, 10, start=100)
    current = run(src.observe())
    assert choose_version(current, released, 20) == (released, False)
    ids = run(src.read(["id"], released.rows, max_bytes=BIG))["id"]
    np.testing.assert_array_equal(ids, np.arange(100))
    make_sqlite(path, 10, start=110)
    current = run(src.observe())
    assert choose_version(current, released, 20) == (current, True)
    assert current.rows == 120


def test_sqlite_is_read_only_and_names_are_quoted(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    make_sqlite(path, 5)
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "we""ird" ("a; DROP TABLE visits; --" INTEGER)')
        conn.execute('INSERT INTO "we""ird" VALUES (7)')
    conn.close()
    # A query that writes fails at the database even past the spec's check.
    sneaky = SourceSpec("sqlite", path=str(path), query="SELECT 1 AS a) ; DELETE FROM visits; (")
    with pytest.raises(SourceUnavailable):
        run(open_source(sneaky).read(None, max_bytes=BIG))
    src = source("sqlite", path, query='SELECT * FROM "we""ird"')
    got = run(src.read(["a; DROP TABLE visits; --"], max_bytes=BIG))
    assert got["a; DROP TABLE visits; --"].tolist() == [7]
    with pytest.raises(BadRequest):
        run(src.read(['a" FROM visits; --'], max_bytes=BIG))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM visits").fetchone() == (5,)
    conn.close()


def test_sqlite_missing_table_and_wrong_types(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    make_sqlite(path, 5)
    with pytest.raises(SourceUnavailable, match="sqlite"):
        run(source("sqlite", path, table="nothing").schema())
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO visits VALUES (9, 'not a number', 1, 'c')")
    conn.close()
    src = source("sqlite", path, table="visits")
    with pytest.raises(ComputationFailed, match="'age'") as caught:
        run(src.read(["age"], max_bytes=BIG))
    assert "not a number" not in str(caught.value)
    with pytest.raises(ComputationFailed, match="'age'"):
        run(src.moments("age", degree=4))
    not_db = tmp_path / "text.db"
    not_db.write_text("hello")
    with pytest.raises(SourceUnavailable):
        run(source("sqlite", not_db, table="visits").schema())
