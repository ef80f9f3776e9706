"""PostgreSQL sources against a real server (the ``postgres_dsn`` fixture)."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from postgres import PostgresDsn

from fdrtd_server.errors import (
    BadRequest,
    ComputationFailed,
    PayloadTooLarge,
    SourceUnavailable,
)
from fdrtd_server.sources import SourceSpec, choose_version, open_source
from fdrtd_server.sources.sql import PostgresSource

BIG = 1 << 30


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture
def visits(postgres_dsn: PostgresDsn) -> Iterator[str]:
    """A table of 1000 visits (age NULL in every 10th row), dropped afterwards."""
    name = "visits_" + secrets.token_hex(4)
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {name} (id int8, age float8, visits int4, ok bool, "
            "city text, weight numeric, born date)"
        )
        append(postgres_dsn, name, 0, 1000)
        conn.execute(f"GRANT SELECT ON {name} TO PUBLIC")
    yield name
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def append(dsn: PostgresDsn, table: str, start: int, rows: int) -> None:
    with psycopg.connect(dsn.owner, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} SELECT i, CASE WHEN i %% 10 = 9 THEN NULL ELSE 20 + i END, "
            "i %% 7, i %% 2 = 0, 'c' || (i %% 3), i * 0.25, DATE '2020-01-01' + i::int "
            "FROM generate_series(%s::int8, %s::int8) AS i",
            (start, start + rows - 1),
        )


def spec(dsn: PostgresDsn, **fields: Any) -> SourceSpec:
    return SourceSpec.from_dict({"kind": "postgresql", "dsn": dsn.reader, **fields})


def test_schema_read_and_nulls(postgres_dsn: PostgresDsn, visits: str) -> None:
    src = open_source(spec(postgres_dsn, table=visits, order_by="id"))
    assert run(src.schema()) == {
        "id": "int64",
        "age": "float64",
        "visits": "int64",
        "ok": "bool",
        "city": "string",
        "weight": "float64",
        "born": "string",
    }
    got = run(src.read(None, max_bytes=BIG))
    np.testing.assert_array_equal(got["id"], np.arange(1000))
    assert np.isnan(got["age"][9]) and got["age"][0] == 20.0
    assert got["visits"].dtype == np.int64 and got["ok"].dtype == bool
    assert got["city"][:3].tolist() == ["c0", "c1", "c2"]
    assert got["weight"][4] == 1.0 and got["born"][1] == "2020-01-02"
    first = run(src.read(["age"], 5, max_bytes=BIG))["age"]
    np.testing.assert_array_equal(first, [20.0, 21.0, 22.0, 23.0, 24.0])


def test_copy_and_cursor_give_the_same_arrays(postgres_dsn: PostgresDsn, visits: str) -> None:
    source_spec = spec(postgres_dsn, table=visits, order_by="id")
    numeric = ["id", "age", "visits", "ok", "weight"]
    by_cursor = run(PostgresSource(source_spec, "cursor").read(numeric, max_bytes=BIG))
    by_copy = run(PostgresSource(source_spec, "copy").read(numeric, max_bytes=BIG))
    for name in numeric:
        assert by_copy[name].dtype == by_cursor[name].dtype, name
        np.testing.assert_array_equal(by_copy[name], by_cursor[name])
    limited = run(PostgresSource(source_spec, "copy").read(["id"], 70_000, max_bytes=BIG))
    assert len(limited["id"]) == 1000
    five = run(PostgresSource(source_spec, "copy").read(["id", "age"], 5, max_bytes=BIG))
    np.testing.assert_array_equal(five["id"], np.arange(5))


def test_moments_pushed_down(postgres_dsn: PostgresDsn, visits: str) -> None:
    src = open_source(spec(postgres_dsn, table=visits, order_by="id"))
    ages = run(src.read(["age"], max_bytes=BIG))["age"]
    ages = ages[~np.isnan(ages)]
    sums = run(src.moments("age", degree=4))
    assert sums.count == len(ages)
    assert sums.sums[2] == pytest.approx((ages**3).sum())
    assert (sums.minimum, sums.maximum) == (ages.min(), ages.max())
    assert run(src.moments("age", 10, degree=4)).count == 9


def test_versions_and_hold_back(postgres_dsn: PostgresDsn, visits: str) -> None:
    src = open_source(spec(postgres_dsn, table=visits, order_by="id", hold_back=100))
    released = run(src.observe())
    assert released.rows == 1000 and len(released.id) == 64
    assert run(src.observe()).id == released.id

    append(postgres_dsn, visits, 1000, 60)
    current = run(src.observe())
    assert current.rows == 1060 and current.id != released.id
    use, new = choose_version(current, released, 100)
    assert (use, new) == (released, False)
    ids = run(src.read(["id"], use.rows, max_bytes=BIG))["id"]
    np.testing.assert_array_equal(ids, np.arange(1000))

    append(postgres_dsn, visits, 1060, 40)
    current = run(src.observe())
    assert choose_version(current, released, 100) == (current, True)
    assert current.rows == 1100

    # The fingerprint is of the content, not of the row order, and sees any change.
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"UPDATE {visits} SET age = age + 1 WHERE id = 3")
    assert run(src.observe()).id != current.id


def test_read_over_max_bytes_is_refused(postgres_dsn: PostgresDsn, visits: str) -> None:
    src = open_source(spec(postgres_dsn, table=visits))
    with pytest.raises(PayloadTooLarge, match="max_bytes=4000"):
        run(src.read(["id"], max_bytes=4000))


def test_fixed_query_and_env_dsn(
    postgres_dsn: PostgresDsn, visits: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FDRTD_TEST_CLINIC_DSN", postgres_dsn.reader)
    src = open_source(
        SourceSpec.from_dict(
            {
                "kind": "postgresql",
                "dsn_env": "FDRTD_TEST_CLINIC_DSN",
                "query": f"SELECT id, age FROM {visits} WHERE ok;",
                "columns": ["age"],
            }
        )
    )
    assert run(src.schema()) == {"age": "float64"}
    assert len(run(src.read(None, max_bytes=BIG))["age"]) == 500
    monkeypatch.delenv("FDRTD_TEST_CLINIC_DSN")
    with pytest.raises(SourceUnavailable, match="dsn_env"):
        run(open_source(src.spec).schema())


def test_read_only_even_for_a_writing_query(postgres_dsn: PostgresDsn, visits: str) -> None:
    # As if a spec were written around the checks: the database still refuses to write.
    for query in (
        f"WITH gone AS (DELETE FROM {visits} RETURNING id) SELECT id FROM gone",
        f"SELECT 1 AS a) AS x; DELETE FROM {visits}; SELECT * FROM (SELECT 1",
    ):
        bad = SourceSpec("postgresql", dsn=postgres_dsn.owner, query=query)
        with pytest.raises(SourceUnavailable):
            run(open_source(bad).read(None, max_bytes=BIG))
    with psycopg.connect(postgres_dsn.owner) as conn:
        assert conn.execute(f"SELECT count(*) FROM {visits}").fetchone() == (1000,)


def test_hostile_identifiers_are_quoted(postgres_dsn: PostgresDsn, visits: str) -> None:
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE weird_{visits} ("a; DROP TABLE {visits}; --" int8)')
        conn.execute(f"INSERT INTO weird_{visits} VALUES (7)")
        conn.execute(f"GRANT SELECT ON weird_{visits} TO PUBLIC")
    try:
        column = f"a; DROP TABLE {visits}; --"
        src = open_source(spec(postgres_dsn, table=f"weird_{visits}", order_by=column))
        assert run(src.read([column], max_bytes=BIG))[column].tolist() == [7]
        assert run(src.observe()).rows == 1
        with pytest.raises(BadRequest):
            run(src.read(['x" FROM pg_authid; --'], max_bytes=BIG))
        with pytest.raises(ValueError, match="table"):
            spec(postgres_dsn, table=f"{visits}; DROP TABLE {visits}")
        with psycopg.connect(postgres_dsn.owner) as conn:
            assert conn.execute(f"SELECT count(*) FROM {visits}").fetchone() == (1000,)
    finally:
        with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
            conn.execute(f"DROP TABLE weird_{visits}")


def test_unreachable_database_and_missing_table(postgres_dsn: PostgresDsn) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} dbname=x user=x password=hunter2 connect_timeout=5"
    down = open_source(SourceSpec("postgresql", dsn=dsn, table="t"))
    with pytest.raises(SourceUnavailable) as caught:
        run(down.schema())
    assert caught.value.status == 424
    assert "hunter2" not in str(caught.value) and str(port) not in str(caught.value)

    wrong_login = postgres_dsn.reader.replace("reader-secret", "wrong")
    if wrong_login != postgres_dsn.reader:
        with pytest.raises(SourceUnavailable) as caught:
            run(open_source(SourceSpec("postgresql", dsn=wrong_login, table="t")).schema())
        assert "wrong" not in str(caught.value)

    missing = open_source(spec(postgres_dsn, table="no_such_table"))
    with pytest.raises(SourceUnavailable, match="postgresql"):
        run(missing.schema())


def test_a_type_that_will_not_convert(postgres_dsn: PostgresDsn, visits: str) -> None:
    src = open_source(spec(postgres_dsn, query=f"SELECT 'x'::text AS a FROM {visits}"))
    with pytest.raises(BadRequest):
        run(src.moments("a", degree=4))
    bad_cast = open_source(
        spec(
            postgres_dsn, query=f"SELECT (CASE WHEN id = 5 THEN 1/0 END)::float8 AS a FROM {visits}"
        )
    )
    with pytest.raises((ComputationFailed, SourceUnavailable)):
        run(bad_cast.read(None, max_bytes=BIG))
