"""A real PostgreSQL server for the tests: ``postgres_dsn`` (session-scoped).

Uses ``FDRTD_TEST_POSTGRES_DSN`` when it is set (a database where the tests
may create and drop tables). Otherwise starts a private cluster: ``initdb``
and ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` into a temporary
directory, listening on 127.0.0.1 on a free port (never the system's
cluster), run as the ``postgres`` system user through ``runuser`` when the
tests run as root (PostgreSQL refuses to run as root). It creates a database
``fdrtd`` owned by a role ``fdrtd_owner`` and a role ``fdrtd_reader`` that
may only read; it is stopped when the session ends.

Without server binaries the tests that need it are skipped with the fix
(``apt-get install postgresql``), unless ``FDRTD_REQUIRE_POSTGRES=1`` (as
``.ci/run`` sets), which turns the skip into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PostgresCluster", "PostgresDsn", "find_bin_dir", "postgres_dsn"]


@dataclass(frozen=True)
class PostgresDsn:
    """Connection strings for the test database.

    Attributes:
        owner: A role that may create tables and write (for setting up data).
        reader: A role that may only read (what a source is configured with).
    """

    owner: str
    reader: str


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``pg_ctl``."""
    found = [
        Path(path).parent
        for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")
        if Path(path).with_name("pg_ctl").exists()
    ]
    found.sort(key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary directory (a context manager)."""

    def __init__(self, bin_dir: Path, base: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="fdrtd-pg-", dir=base))
        self.data = self.base / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self.started = False

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, check=check, capture_output=True, text=True, timeout=120, cwd=self.base
        )

    def __enter__(self) -> PostgresCluster:
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chmod(self.base, 0o700)
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories="
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
        except subprocess.CalledProcessError as error:
            log = (self.base / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {error.stderr}\n{log}") from error
        self.started = True
        return self

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str = "") -> str:
        """A libpq connection string for this cluster."""
        dsn = f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"
        return dsn + (f" password={password}" if password else "")

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self._run(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "stop",
                check=False,
            )
        shutil.rmtree(self.base, ignore_errors=True)


def _set_up_database(admin_dsn: str) -> PostgresDsn:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for statement in (
            "DROP DATABASE IF EXISTS fdrtd",
            "DROP ROLE IF EXISTS fdrtd_owner",
            "DROP ROLE IF EXISTS fdrtd_reader",
            "CREATE ROLE fdrtd_owner LOGIN PASSWORD 'owner-secret'",
            "CREATE ROLE fdrtd_reader LOGIN PASSWORD 'reader-secret'",
            "CREATE DATABASE fdrtd OWNER fdrtd_owner",
        ):
            conn.execute(statement)  # type: ignore[arg-type]
    base = admin_dsn.replace("dbname=postgres", "dbname=fdrtd")
    owner = base.replace("user=postgres", "user=fdrtd_owner") + " password=owner-secret"
    reader = base.replace("user=postgres", "user=fdrtd_reader") + " password=reader-secret"
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute("GRANT USAGE ON SCHEMA public TO fdrtd_reader")
        conn.execute(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO fdrtd_reader"
        )
    return PostgresDsn(owner=owner, reader=reader)


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresDsn]:
    """A real PostgreSQL database with an owner role and a read-only role."""
    given = os.environ.get("FDRTD_TEST_POSTGRES_DSN", "")
    if given:
        # Tests create their own tables under unique names; the given role must own them.
        yield PostgresDsn(owner=given, reader=given)
        return
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = (
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: "
            "install them with `apt-get install postgresql`, or set FDRTD_TEST_POSTGRES_DSN"
        )
        if os.environ.get("FDRTD_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (FDRTD_REQUIRE_POSTGRES=1 requires a server)")
        pytest.skip(reason)
    with PostgresCluster(bin_dir) as cluster:
        yield _set_up_database(cluster.dsn())
