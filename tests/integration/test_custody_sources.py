"""Data where it lives: three owners' data read in place, one analyst who holds none of it.

alpha keeps its records in a real PostgreSQL table, beta in a directory of
CSV files and a Parquet file, gamma uploaded them. The admins register the
sources (over HTTP, and from the command line), the owners grant the
analyst, and the analyst finds ``visits`` through the directory and computes
on it as one dataset. The hold-back rule, versions in results, and every
refusal of a source (malformed, missing, unreachable, unknown) are tried.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from _processes import NO_DP, wait_for
from postgres import PostgresDsn

from fdrtd_client import BadRequest, Client, NotFound, ServerError
from fdrtd_server.local import LocalFederation

ALPHA = np.round(np.linspace(20.0, 80.0, 60), 3)
BETA_FILES = [np.arange(10.0, 30.0), np.arange(30.0, 45.0)]
GAMMA = np.array([33.0, 41.0, 29.0, 52.0, 47.0, 38.0])
HOLD_BACK = 10


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_csv(path: Path, values: np.ndarray[Any, Any]) -> None:
    lines = ["age,site"] + [f"{v},s{i % 3}" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n", "utf-8")


class World:
    def __init__(self, local: LocalFederation, root: Path, table: str) -> None:
        self.local, self.root, self.table = local, root, table
        self.servers = local.servers

    def client(self, name: str, role: str) -> Client:
        server = self.servers[name]
        token = {"owner": server.owner_token, "admin": server.admin_token}.get(role, server.token)
        return Client(server.url, token)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: PostgresDsn) -> Iterator[World]:
    root = tmp_path_factory.mktemp("custody-sources")
    table = "visits_" + secrets.token_hex(4)
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int8, age float8)")
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", list(enumerate(ALPHA.tolist()))
            )
        conn.execute(f"GRANT SELECT ON {table} TO PUBLIC")
    csv_dir = root / "beta-csv"
    csv_dir.mkdir()
    for i, values in enumerate(BETA_FILES):
        _write_csv(csv_dir / f"part-{i}.csv", values)
    pq.write_table(pa.table({"age": BETA_FILES[0] * 2}), root / "beta.parquet")
    env = {
        "ALPHA_VISITS_DSN": postgres_dsn.reader,
        "BROKEN_DSN": f"postgresql://x@127.0.0.1:{_closed_port()}/x",
    }
    local = LocalFederation(
        root / "servers", directories=("alpha",), directory_interval=0.5, env=env, policy=NO_DP
    )
    with local:
        world = World(local, root, table)
        alpha_admin = world.client("alpha", "admin")
        alpha_admin.add_source(
            "visits",
            "owner",
            {"kind": "postgresql", "dsn_env": "ALPHA_VISITS_DSN", "table": table, "order_by": "id"},
            "visits at alpha",
        )
        # beta's admin registers from the command line, the server running
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fdrtd_server",
                "source",
                "add",
                str(world.servers["beta"].home),
                "visits",
                "--owner",
                "owner",
                "--kind",
                "csv",
                "--path",
                str(csv_dir),
                "--hold-back",
                str(HOLD_BACK),
            ],
            check=True,
        )
        gamma_owner = world.client("gamma", "owner")
        gamma_owner.publish(gamma_owner.upload({"age": GAMMA}), "visits")
        for name in ("alpha", "beta", "gamma"):
            world.client(name, "owner").grant("visits", "analyst")
        yield world
    with psycopg.connect(postgres_dsn.owner, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_an_analyst_computes_over_postgresql_csv_and_an_upload(world: World) -> None:
    with world.local.federation() as fed:
        wait_for(
            lambda: {m["name"] for m in fed.directory()} == {"alpha", "beta", "gamma"},
            "every member's first heartbeat",
        )
        entries = {e["server"]: e for e in fed.catalogue() if e["name"] == "visits"}
        assert sorted(entries) == ["alpha", "beta", "gamma"]
        assert entries["alpha"]["kind"] == "postgresql"
        assert entries["alpha"]["columns"]["age"] == "float64"
        assert entries["beta"]["kind"] == "csv"
        for entry in entries.values():
            assert "dsn" not in str(entry) and "path" not in entry
        visits = fed.dataset("visits")
        job = fed.compute("smpc", "univariate", visits, column="age")
        result = job.result(timeout=120)
        everything = np.concatenate([ALPHA, *BETA_FILES, GAMMA])
        assert result["samples"] == everything.size
        assert result["mean"] == pytest.approx(everything.mean())
        assert result["maximum"] == pytest.approx(everything.max())
        job.results(timeout=120)
        versions = {job_.client.url: job_.versions["visits"] for job_ in job.jobs}
        assert all(v["id"] and v["time"] for v in versions.values())
        beta_version = job.jobs[1].versions["visits"]
        assert beta_version["id"] == entries["beta"]["version"]["id"]
        # map-reduce over the same dataset
        assert fed.map_reduce(visits, column="age")["count"] == everything.size


def test_new_rows_are_held_back_until_enough_have_accumulated(world: World) -> None:
    beta = world.client("beta", "analyst")

    def count() -> tuple[int, str]:
        job = beta.compute("map", "aggregate", data="visits", column="age")
        value = job.result(timeout=60)
        return int(value["count"]), job.versions["visits"]["id"]

    before, version = count()
    csv_dir = world.root / "beta-csv"
    _write_csv(csv_dir / "part-2.csv", np.arange(100.0, 100.0 + HOLD_BACK - 1))
    assert count() == (before, version)  # fewer than HOLD_BACK new rows: held back
    _write_csv(csv_dir / "part-3.csv", np.arange(200.0, 203.0))
    after, newer = count()
    assert after == before + HOLD_BACK - 1 + 3 and newer != version
    for part in ("part-2.csv", "part-3.csv"):  # back as the other tests expect it
        (csv_dir / part).unlink()


def _register(world: World, name: str, source: dict[str, Any]) -> None:
    world.client("alpha", "admin").add_source(name, "owner", source)
    world.client("alpha", "owner").grant(name, "analyst")


def _refusal(world: World, name: str) -> ServerError:
    analyst = world.client("alpha", "analyst")
    with pytest.raises(ServerError) as refused:
        analyst.compute("map", "aggregate", data=name, column="age").result(timeout=60)
    return refused.value


def test_bad_sources_get_a_clear_4xx_and_leave_the_server_healthy(world: World) -> None:
    malformed = world.root / "malformed.csv"
    malformed.write_text('age,site\n1,a\n2,"b\n3\n"4,,,,\n', "utf-8")
    wrong = world.root / "wrong.csv"
    wrong.write_text("age,site\nold,a\nyoung,b\nolder,c\n", "utf-8")
    _register(world, "malformed", {"kind": "csv", "path": str(malformed)})
    _register(world, "wrongtype", {"kind": "csv", "path": str(wrong)})
    _register(world, "missing", {"kind": "parquet", "path": str(world.root / "gone.parquet")})
    _register(world, "unreachable", {"kind": "postgresql", "dsn_env": "BROKEN_DSN", "table": "t"})
    answers = {
        name: _refusal(world, name) for name in ("malformed", "wrongtype", "missing", "unreachable")
    }
    for name, error in answers.items():
        assert 400 <= error.status < 500, (name, error)
        assert "127.0.0.1" not in error.detail and str(world.root) not in error.detail, name
    assert answers["missing"].status == 424 and answers["unreachable"].status == 424
    assert isinstance(_refusal(world, "no-such-source"), NotFound)
    server = world.servers["alpha"]
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
    listed = {e["name"]: e for e in world.client("alpha", "analyst").catalogue()}
    assert "error" in listed["missing"] and listed["visits"]["rows"] == 60


def test_a_client_never_sends_sql_or_a_path(world: World) -> None:
    analyst = world.client("alpha", "analyst")
    for attempt in ("visits; DROP TABLE x", "../etc/passwd", "/etc/passwd", "visits' OR '1'='1"):
        with pytest.raises(BadRequest):
            analyst.compute("map", "aggregate", data=attempt, column="age")
    admin = world.client("alpha", "admin")
    for source in (
        {"kind": "postgresql", "dsn_env": "ALPHA_VISITS_DSN", "table": "t; DROP TABLE t"},
        {"kind": "postgresql", "dsn_env": "ALPHA_VISITS_DSN", "query": "DELETE FROM t"},
        {"kind": "sqlite", "path": "x.db", "table": 'a" OR 1=1 --'},
    ):
        with pytest.raises(BadRequest):
            admin.add_source("evil", "owner", source)
    with pytest.raises(ServerError) as bad_column:
        analyst.compute("map", "aggregate", data="visits", column='age"; DROP TABLE x; --').result(
            timeout=60
        )
    assert bad_column.value.status == 400
    with psycopg.connect(world.local.env["ALPHA_VISITS_DSN"]) as conn:
        assert conn.execute(f"SELECT count(*) FROM {world.table}").fetchone() == (60,)


def test_a_sqlite_source(world: World) -> None:
    import sqlite3

    path = world.root / "gamma.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE v (id INTEGER, age REAL)")
        conn.executemany("INSERT INTO v VALUES (?, ?)", list(enumerate([5.0, 6.0, 7.0, 9.0])))
    world.client("gamma", "admin").add_source(
        "lab", "owner", {"kind": "sqlite", "path": str(path), "table": "v"}
    )
    world.client("gamma", "owner").grant("lab", "analyst")
    value = world.client("gamma", "analyst").compute("map", "aggregate", data="lab", column="age")
    assert value.result(timeout=60)["sum"] == 27.0
