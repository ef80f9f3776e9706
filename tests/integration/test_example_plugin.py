"""The example plugin of docs/plugins.md (examples/vector_mean) against three real servers.

The package is pip-installed by the ``example_plugin`` fixture of
``tests/conftest.py`` (again whenever the installed copy is stale) before
the shared trio starts, so every server discovers it through its entry
point, exactly as an institution's own plugin would be found.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from fdrtd_client.errors import ServerError
from fdrtd_server.local import LocalFederation

TIMEOUT = 60.0


def test_every_server_lists_the_example_plugin(trio: LocalFederation) -> None:
    for server in trio.servers.values():
        listed = requests.get(
            server.url + "/v1/microservices",
            headers={"authorization": f"Bearer {server.token}"},
            timeout=TIMEOUT,
        ).json()
        assert "vector_mean" in str(listed)


def test_the_secure_vector_mean_over_three_servers(trio: LocalFederation) -> None:
    rng = np.random.default_rng(13)
    with trio.federation() as federation:
        rows = {name: rng.normal(size=(4 + i, 3)) * 10 for i, name in enumerate(federation.parties)}
        handles = federation.upload({name: {"x": values} for name, values in rows.items()})
        job = federation.compute(
            "vector_mean", "mean", {name: {"data": h} for name, h in handles.items()}, column="x"
        )
        results = job.results(timeout=TIMEOUT)
    expected = np.concatenate(list(rows.values())).mean(axis=0)
    for result in results:
        assert result["count"] == 15
        np.testing.assert_allclose(result["mean"], expected, atol=1e-5)


def test_a_mismatch_of_dimensions_is_refused_on_every_server(trio: LocalFederation) -> None:
    with trio.federation() as federation:
        data = {name: {"x": np.ones((5, 3))} for name in federation.parties}
        data[federation.parties[-1]] = {"x": np.ones((5, 2))}
        handles = federation.upload(data)
        job = federation.compute(
            "vector_mean", "mean", {name: {"data": h} for name, h in handles.items()}, column="x"
        )
        with pytest.raises(ServerError, match="disagree on 'dimension'") as refused:
            job.results(timeout=TIMEOUT)
    assert refused.value.status == 422
