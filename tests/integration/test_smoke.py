from __future__ import annotations

import numpy as np

from fdrtd_server.local import LocalFederation, LocalServer


def test_upload_and_map_aggregate(server: LocalServer) -> None:
    client = server.client()
    handle = client.upload(np.arange(10.0))
    result = client.compute("map", "aggregate", data=handle).result(timeout=30)
    assert result["count"] == 10
    assert result["sum"] == 45.0
    assert "minimum" not in result and "maximum" not in result  # single records' values


def test_example_plugin_is_called(server: LocalServer) -> None:
    client = server.client()
    handle = client.upload(np.arange(12.0))
    assert client.compute("example", "rows", data=handle).result(timeout=30) == {"rows": 12}


def test_secure_sum_three_parties(trio: LocalFederation) -> None:
    federation = trio.federation()
    data = {name: np.arange(5.0) * (i + 1) for i, name in enumerate(federation.parties)}
    handles = federation.upload(data)
    job = federation.compute("smpc", "secure_sum", {n: {"data": h} for n, h in handles.items()})
    assert job.results(timeout=30) == [{"sum": 60.0, "count": 15}] * 3
