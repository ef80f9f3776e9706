"""Pending (fails today): /v1/compute must not reach data.register (see report)."""

from __future__ import annotations

import numpy as np
import requests

from fdrtd_client import Client
from fdrtd_server.config import TokenStore
from fdrtd_server.local import LocalServer


def test_compute_cannot_reach_internal_data_functions(server: LocalServer) -> None:
    owner = server.client()
    handle = owner.upload(np.arange(10.0))
    victim = owner.upload(np.arange(10.0))
    token = TokenStore(server.home).add("mallory")
    mallory = Client(server.url, token)
    headers = {"authorization": f"Bearer {token}"}
    takeover = {"handle": handle, "size": 80, "format": "raw", "dtype": "<f8"}
    destroy = {"handle": victim, "size": -1}
    for inputs in (takeover, destroy):
        requests.post(
            server.url + "/v1/compute",
            json={"microservice": "data", "function": "register", "inputs": inputs},
            headers=headers,
            timeout=30,
        )
    assert handle not in {entry["handle"] for entry in mallory.datasets()}
    assert owner.describe(handle)["rows"] == 10
    assert owner.compute("map", "aggregate", data=victim).result(30)["count"] == 10
