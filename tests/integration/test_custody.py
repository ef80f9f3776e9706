"""Custody end to end: owners publish and grant, an analyst who uploaded nothing computes.

Three real servers. On each, the owner uploads her records and publishes
them as the dataset ``cohort``, then grants the analyst its use. The analyst
finds ``cohort`` in the catalogue of every server and computes on it as one
dataset; every refusal (no grant, a grant for other functions, a grant out
of its time window, a revoked grant, the wrong role) is tried.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import requests
from _processes import NO_DP, wait_for

from fdrtd_client import Client, Federation, NotFound, ServerError
from fdrtd_server.config import TokenStore
from fdrtd_server.local import LocalFederation

VALUES = {
    "alpha": np.arange(1.0, 41.0),
    "beta": np.linspace(-3.0, 9.0, 25),
    "gamma": np.array([2.5, 7.0, 1.0, 4.0, 8.5, 3.0, 6.0]),
}


class World:
    def __init__(self, local: LocalFederation) -> None:
        self.local = local
        self.servers = local.servers
        self.eve: dict[str, str] = {
            name: TokenStore(server.home).add("eve") for name, server in self.servers.items()
        }

    def owner(self, name: str) -> Client:
        return Client(self.servers[name].url, self.servers[name].owner_token)

    def analyst(self, name: str) -> Client:
        return self.servers[name].client()

    def admin(self, name: str) -> Client:
        return Client(self.servers[name].url, self.servers[name].admin_token)

    def federation(self) -> Federation:
        return self.local.federation()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("custody")
    with LocalFederation(root, policy=NO_DP) as local:  # exact statistics: no DP
        world = World(local)
        for name, values in VALUES.items():
            owner = world.owner(name)
            handle = owner.upload(values)
            owner.publish(handle, "cohort", f"{name}'s cohort")
            owner.grant("cohort", "analyst")
        yield world


def test_an_analyst_who_uploaded_nothing_computes_over_three_owners_data(world: World) -> None:
    with world.federation() as fed:
        assert all(not fed.clients[name].datasets() for name in fed.parties)  # nothing of hers
        listed = fed.catalogue()
        assert sorted(entry["server"] for entry in listed) == ["alpha", "beta", "gamma"]
        for entry in listed:
            assert entry["name"] == "cohort"
            assert entry["owner"] == "owner"
            assert entry["columns"] == {"value": "<f8"}
            assert isinstance(entry["rows"], int)
            assert entry["functions"] == ["*"]
            assert entry["version"]["time"]
        cohort = fed.dataset("cohort")
        assert cohort.parties == ["alpha", "beta", "gamma"]
        job = fed.compute("smpc", "univariate", cohort)
        result = job.result(timeout=120)
        everything = np.concatenate(list(VALUES.values()))
        assert result["samples"] == everything.size
        assert result["mean"] == pytest.approx(everything.mean())
        job.results(timeout=120)
        ids = {name: j.versions["cohort"]["id"] for j, name in zip(job.jobs, VALUES, strict=True)}
        assert len(set(ids.values())) == 3  # each fragment has its own
        listed_ids = {e["server"]: e["version"]["id"] for e in fed.catalogue()}
        assert listed_ids == ids  # the catalogue and the results name the same versions
        for name, values in VALUES.items():  # never the plain hash: no guess can be tested
            assert ids[name] != hashlib.sha256(values.tobytes()).hexdigest()
        # map-reduce takes the same dataset
        combined = fed.map_reduce(cohort)
        assert combined["count"] == everything.size


def test_the_catalogue_shows_what_the_caller_may_use_and_never_values(world: World) -> None:
    eve = Client(world.servers["alpha"].url, world.eve["alpha"])
    assert eve.catalogue() == []
    admin = world.admin("alpha").catalogue()
    assert [entry["name"] for entry in admin] == ["cohort"]
    text = requests.get(
        world.servers["alpha"].url + "/v1/catalogue",
        headers={"authorization": f"Bearer {world.servers['alpha'].token}"},
        timeout=30,
    ).text
    for value in VALUES["alpha"][:5]:
        assert f"{value:.1f}," not in text


def test_rows_are_coarse_and_under_k_below_the_minimum_cohort(world: World) -> None:
    owner = world.owner("beta")
    owner.publish(owner.upload([1.0, 2.0]), "tiny")
    rows = {entry["name"]: entry["rows"] for entry in owner.catalogue()}
    assert rows == {"cohort": 20, "tiny": "under 3"}  # 25 rows, rounded to tens
    world.owner("beta").withdraw("tiny")


def compute_one(client: Client, name: str, function: str = "aggregate") -> Any:
    return client.compute("map", function, data=name).result(timeout=60)


def test_without_a_grant_the_dataset_does_not_exist(world: World) -> None:
    eve = Client(world.servers["alpha"].url, world.eve["alpha"])
    with pytest.raises(NotFound) as refused:
        compute_one(eve, "cohort")
    with pytest.raises(NotFound) as unknown:
        compute_one(eve, "no-such-dataset")
    assert "no dataset named 'cohort'" in str(refused.value)
    assert str(refused.value).replace("cohort", "X") == str(unknown.value).replace(
        "no-such-dataset", "X"
    )


def test_a_grant_limited_to_functions_and_a_time_window(world: World) -> None:
    owner, eve = world.owner("gamma"), Client(world.servers["gamma"].url, world.eve["gamma"])
    owner.grant("cohort", "eve", functions=["map.aggregate"])
    assert compute_one(eve, "cohort")["count"] == VALUES["gamma"].size
    assert [entry["functions"] for entry in eve.catalogue()] == [["map.aggregate"]]
    owner.grant("cohort", "eve", functions=["smpc.*"])
    with pytest.raises(NotFound):
        compute_one(eve, "cohort")
    now = datetime.now(UTC)
    owner.grant("cohort", "eve", not_after=(now - timedelta(minutes=1)).isoformat())
    with pytest.raises(NotFound):
        compute_one(eve, "cohort")
    assert eve.catalogue() == []
    owner.grant("cohort", "eve", not_before=(now + timedelta(hours=1)).isoformat())
    with pytest.raises(NotFound):
        compute_one(eve, "cohort")
    owner.revoke("cohort", "eve")


def test_revocation_applies_to_the_next_request(world: World) -> None:
    owner, eve = world.owner("alpha"), Client(world.servers["alpha"].url, world.eve["alpha"])
    owner.grant("cohort", "eve")
    assert compute_one(eve, "cohort")["count"] == VALUES["alpha"].size
    owner.revoke("cohort", "eve")
    with pytest.raises(NotFound):
        compute_one(eve, "cohort")
    # and from the command line, against the running server
    cli = [sys.executable, "-m", "fdrtd_server"]
    home = str(world.servers["alpha"].home)
    subprocess.run([*cli, "grant", "add", home, "cohort", "eve"], check=True)
    assert compute_one(eve, "cohort")["count"] == VALUES["alpha"].size
    listed = subprocess.run(
        [*cli, "grant", "list", home, "cohort"], check=True, capture_output=True, text=True
    ).stdout
    assert '"grantee": "eve"' in listed
    subprocess.run([*cli, "grant", "revoke", home, "cohort", "eve"], check=True)
    with pytest.raises(NotFound):
        compute_one(eve, "cohort")


def test_publishing_is_for_owners_and_names_are_checked(world: World) -> None:
    server = world.servers["alpha"]
    owner, analyst = world.owner("alpha"), world.analyst("alpha")
    mine = analyst.upload([1.0, 2.0, 3.0])
    status = _post(server.url, server.token, "/v1/datasets", {"handle": mine, "name": "x"})
    assert status == 403  # an analyst's uploads stay private
    # another's handle is unknown to the owner
    status = _post(server.url, server.owner_token, "/v1/datasets", {"handle": mine, "name": "x"})
    assert status == 404
    handle = owner.upload([4.0, 5.0, 6.0])
    for name in ("", "Bad", "../etc", "d-" + "0" * 40, "a" * 64, 7):
        body = {"handle": handle, "name": name}
        assert _post(server.url, server.owner_token, "/v1/datasets", body) == 400, name
    body = {"handle": handle, "name": "cohort"}
    assert _post(server.url, server.owner_token, "/v1/datasets", body) == 409
    owner.publish(handle, "second")
    # a published upload is withdrawn before it can be released
    response = requests.delete(
        f"{server.url}/v1/data/{handle}", headers=_auth(server.owner_token), timeout=30
    )
    assert response.status_code == 409
    assert "withdraw" in response.json()["detail"]
    owner.withdraw("second")
    owner.release(handle)


def _auth(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _post(url: str, token: str, path: str, body: Any) -> int:
    return requests.post(url + path, json=body, headers=_auth(token), timeout=30).status_code


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/microservices", None),
    ("POST", "/v1/data", None),
    ("GET", "/v1/results/r-" + "1" * 40 + "/events", None),
    ("GET", "/v1/catalogue", None),
    ("GET", "/v1/directory", None),
    ("GET", "/v1/data", None),
    ("POST", "/v1/compute", {"microservice": "map", "function": "aggregate", "inputs": {}}),
    ("POST", "/v1/datasets", {"handle": "d-" + "1" * 40, "name": "zz"}),
    ("DELETE", "/v1/datasets/zz", None),
    ("GET", "/v1/grants", None),
    ("POST", "/v1/grants", {"dataset": "zz", "grantee": "eve"}),
    ("DELETE", "/v1/grants/zz/eve", None),
    ("GET", "/v1/sources", None),
    ("POST", "/v1/sources", {"name": "zz", "owner": "owner", "source": {"kind": "nope"}}),
    ("DELETE", "/v1/sources/zz", None),
    ("GET", "/v1/data/d-" + "1" * 40, None),
    ("DELETE", "/v1/data/d-" + "1" * 40, None),
    ("GET", "/v1/results/r-" + "1" * 40, None),
    ("DELETE", "/v1/results/r-" + "1" * 40, None),
]
ALLOWED = {
    "/v1/microservices": {"admin", "owner", "analyst"},
    "/v1/catalogue": {"admin", "owner", "analyst"},
    "/v1/directory": {"admin", "owner", "analyst"},
    "/v1/data": {"owner", "analyst"},
    "/v1/compute": {"owner", "analyst"},
    "/v1/datasets": {"owner"},
    "/v1/datasets/zz": {"owner", "admin"},
    "/v1/grants": {"owner", "admin"},
    "/v1/grants/zz/eve": {"owner", "admin"},
    "/v1/sources": {"admin"},
    "/v1/sources/zz": {"admin"},
}


def _allowed(path: str) -> set[str]:
    if path.startswith(("/v1/data/", "/v1/results/")) or path == "/v1/data":
        return {"owner", "analyst"}
    return ALLOWED[path]


def test_every_route_checks_the_role(world: World) -> None:
    server = world.servers["beta"]
    tokens = {
        "admin": server.admin_token,
        "owner": server.owner_token,
        "analyst": server.token,
        None: None,
    }
    for method, path, body in ROUTES:
        for role, token in tokens.items():
            response = requests.request(
                method, server.url + path, json=body, headers=_auth(token), timeout=30
            )
            status = response.status_code
            assert response.headers["content-type"].startswith(
                ("application/json", "application/problem+json")
            ), (method, path, role)
            if role is None:
                assert status == 401, (method, path)
            elif role in _allowed(path):
                assert status != 403 and status < 500, (method, path, role, response.text)
            else:
                assert status == 403, (method, path, role, response.text)
                assert f"'{role}'" in response.json()["detail"]
    # the server is healthy, and the cohort as it was
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
    assert compute_one(world.analyst("beta"), "cohort")["count"] == VALUES["beta"].size


def test_the_admin_cannot_compute_on_an_owners_data(world: World) -> None:
    admin = world.admin("alpha")
    with pytest.raises(Exception) as refused:
        compute_one(admin, "cohort")
    assert getattr(refused.value, "status", None) == 403


def test_unauthenticated_routes_stay_open(world: World) -> None:
    server = world.servers["alpha"]
    for path in ("/healthz", "/readyz", "/v1/openapi.json", "/v1/identity"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path


def test_record_level_functions_need_a_grant_that_names_them(world: World) -> None:
    """An analyst's own one-value upload beside an owner's data: the k-th smallest for
    every k would read out the owner's column. A grant of every function does not
    cover it; only a grant naming it does."""
    with world.federation() as fed:
        mine = fed.clients["beta"].upload([1000.0, 1001.0, 1002.0])
        inputs = {"alpha": {"data": "cohort"}, "beta": {"data": mine}}
        # alpha answers 404; beta may report first that alpha ended the session, with why
        with pytest.raises(ServerError, match="no dataset named 'cohort'"):
            fed.compute("smpc", "kth_smallest", inputs, k=1).result(timeout=60)
        world.owner("alpha").grant("cohort", "analyst", functions=["smpc.kth_smallest"])
        try:
            value = fed.compute("smpc", "kth_smallest", inputs, k=1).result(timeout=60)
            assert value is not None
        finally:
            world.owner("alpha").grant("cohort", "analyst")  # back to every function


def test_a_grant_names_a_token_that_exists_and_a_sane_time(world: World) -> None:
    server = world.servers["alpha"]
    body = {"dataset": "cohort", "grantee": "zed"}
    assert _post(server.url, server.owner_token, "/v1/grants", body) == 400
    for moment in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "tomorrow", 5):
        body = {"dataset": "cohort", "grantee": "eve", "not_before": moment}
        assert _post(server.url, server.owner_token, "/v1/grants", body) == 400, moment
    source = {"name": "x", "owner": "eve", "source": {"kind": "csv", "path": "/nonexistent"}}
    assert _post(server.url, server.admin_token, "/v1/sources", source) == 400  # not an owner


def test_the_audit_says_who_read_which_dataset_and_what_was_refused(world: World) -> None:
    server = world.servers["gamma"]
    compute_one(world.analyst("gamma"), "cohort")
    body = {"handle": "d-" + "2" * 40, "name": "cohort"}
    assert _post(server.url, server.owner_token, "/v1/datasets", body) == 404

    def logged() -> bool:
        text = (server.home / "audit.log").read_text("utf-8")
        return "cohort@" in text and "refused 404" in text

    wait_for(logged, "the audit records")
