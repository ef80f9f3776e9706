"""Sources given in ``fdrtd.toml`` and from the command line, on a real server."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _processes import cli, make_server, without_dp

from fdrtd_client import Client, Conflict
from fdrtd_server.config import TokenStore


def test_a_configured_source_is_served_and_changed_only_in_the_file(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    without_dp(server.home)  # exact aggregates of a named dataset
    owner = TokenStore(server.home).add("clinic", "owner")
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 4.0, 5.0]}), tmp_path / "x.parquet")
    config = server.home / "fdrtd.toml"
    config.write_text(
        config.read_text("utf-8")
        + f'\n[sources.measurements]\nowner = "clinic"\nkind = "parquet"\n'
        f'path = "{tmp_path / "x.parquet"}"\ndescription = "five values"\n',
        "utf-8",
    )
    server.start()
    try:
        with Client(server.url, owner) as clinic, Client(server.url, server.admin_token) as admin:
            (entry,) = clinic.catalogue()
            assert (entry["name"], entry["kind"], entry["description"]) == (
                "measurements",
                "parquet",
                "five values",
            )
            assert admin.sources()[0]["configured"] is True
            with pytest.raises(Conflict):
                admin.request("DELETE", "/v1/sources/measurements")
            clinic.grant("measurements", "analyst")
            with server.client() as analyst:
                job = analyst.compute("map", "aggregate", data="measurements", column="x")
                assert job.result(timeout=60)["sum"] == 15.0
            # the command line lists it, and refuses to remove it
            listed = cli("source", "list", str(server.home))
            assert '"measurements"' in listed.stdout and '"configured": true' in listed.stdout
            removed = cli("source", "remove", str(server.home), "measurements")
            assert removed.returncode == 2 and "fdrtd.toml" in removed.stderr
    finally:
        server.stop()


def test_a_bad_sources_table_stops_the_start_naming_it(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    config = server.home / "fdrtd.toml"
    config.write_text(
        config.read_text("utf-8") + '\n[sources.broken]\nowner = "x"\nkind = "excel"\n', "utf-8"
    )
    started = cli("serve", str(server.home))
    assert started.returncode == 2
    assert "[sources.broken]" in started.stderr and "kind" in started.stderr


def test_the_command_line_grants_and_registers_only_for_existing_tokens(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    TokenStore(server.home).add("clinic", "owner")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0]}), path)
    home = str(server.home)
    for owner in ("nobody", "analyst"):  # unknown, and not an owner
        added = cli(
            "source", "add", home, "x", "--owner", owner, "--kind", "parquet", "--path", str(path)
        )
        assert added.returncode == 2 and f"'{owner}'" in added.stderr
    added = cli(
        "source", "add", home, "x", "--owner", "clinic", "--kind", "parquet", "--path", str(path)
    )
    assert added.returncode == 0, added.stderr
    refused = cli("grant", "add", home, "x", "zed")
    assert refused.returncode == 2 and "'zed'" in refused.stderr
    assert cli("grant", "add", home, "x", "analyst").returncode == 0
