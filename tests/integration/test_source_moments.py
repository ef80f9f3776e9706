"""Aggregates where the data lives agree with the same sums over the values in memory.

``Source.moments`` is the fast path of univariate statistics over a source
read in place: SQL in PostgreSQL, streamed batches for files and SQLite. Each
kind is checked against :func:`protocols.smpc.stats_math.local_power_sums`
(the path of uploads) on the same values, NULL, NaN and infinities included,
and under a row limit (a held-back version).
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from postgres import PostgresDsn

from fdrtd_server.sources import Source, SourceSpec, open_source
from protocols.smpc import stats_math

RNG = np.random.default_rng(7)
VALUES = np.concatenate([RNG.normal(50.0, 12.0, 3000), [np.nan, np.inf, -np.inf]])
RNG.shuffle(VALUES)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def expected(values: np.ndarray[Any, Any], shift: float, scale: float | None) -> list[float]:
    finite = values[np.isfinite(values)]
    return list(stats_math.local_power_sums(finite, shift=shift, positive_minimum=scale))


@pytest.fixture(scope="module")
def sources(
    tmp_path_factory: pytest.TempPathFactory, postgres_dsn: PostgresDsn
) -> Iterator[dict[str, Source]]:
    root: Path = tmp_path_factory.mktemp("moments")
    text = ["x"] + [("" if not np.isfinite(v) and np.isnan(v) else repr(float(v))) for v in VALUES]
    (root / "v.csv").write_text("\n".join(text) + "\n", "utf-8")
    pq.write_table(pa.table({"x": VALUES}), root / "v.parquet", row_group_size=700)
    with sqlite3.connect(root / "v.db") as conn:
        conn.execute("CREATE TABLE v (id INTEGER, x REAL)")
        rows = [(i, None if np.isnan(v) else float(v)) for i, v in enumerate(VALUES)]
        conn.executemany("INSERT INTO v VALUES (?, ?)", rows)
    table = "moments_" + secrets.token_hex(4)
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int8, x float8)")
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)",
                [(i, None if np.isnan(v) else float(v)) for i, v in enumerate(VALUES)],
            )
        conn.execute(f"GRANT SELECT ON {table} TO PUBLIC")
    specs = {
        "csv": {"kind": "csv", "path": str(root / "v.csv")},
        "parquet": {"kind": "parquet", "path": str(root / "v.parquet")},
        "sqlite": {"kind": "sqlite", "path": str(root / "v.db"), "table": "v", "order_by": "id"},
        "postgresql": {
            "kind": "postgresql",
            "dsn": postgres_dsn.reader,
            "table": table,
            "order_by": "id",
        },
    }
    yield {kind: open_source(SourceSpec.from_dict(spec)) for kind, spec in specs.items()}
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


KINDS = ("csv", "parquet", "sqlite", "postgresql")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [None, 1234])
def test_moments_where_the_data_lives_match_the_sums_in_memory(
    sources: dict[str, Source], kind: str, rows: int | None
) -> None:
    source = sources[kind]
    values = VALUES if rows is None else VALUES[:rows]
    finite = values[np.isfinite(values)]
    first = run(source.moments("x", rows, degree=1))
    assert first.count == finite.size
    assert first.sums[0] == pytest.approx(finite.sum(), rel=1e-12)
    assert (first.minimum, first.maximum) == (finite.min(), finite.max())
    shift = float(finite.mean())
    for scale in (None, float(finite.min()) if finite.min() > 0 else None):
        found = run(source.moments("x", rows, shift=shift, degree=6, positive_minimum=scale))
        got = [found.count, *found.sums, found.reciprocal, found.log]
        assert got == pytest.approx(expected(values, shift, scale), rel=1e-9, abs=1e-6)


def test_a_source_with_positive_values_sums_reciprocals_and_logs(
    sources: dict[str, Source],
) -> None:
    """Shifted far from zero, every value is positive: the sums of 1/x and ln x match."""
    source = sources["postgresql"]
    finite = VALUES[np.isfinite(VALUES)]
    lowest = float(finite.min())
    assert lowest > 0  # the seeded sample lies far above zero
    found = run(source.moments("x", shift=50.0, degree=6, positive_minimum=lowest))
    assert found.reciprocal == pytest.approx(float((lowest / finite).sum()), rel=1e-12)
    assert found.log == pytest.approx(float(np.log(finite).sum()), rel=1e-12)
