"""The owner's policy on running servers: each rule tried as an analyst would try to break it.

Three real servers. On alpha, the owner publishes ``patients`` (40 records)
and ``small`` (20 records) and grants the analyst their use; alpha's
``policy.toml`` says what may be done with them. The analyst tries a
function the policy forbids, a query under the minimum cohort, a table with
small and empty cells, padding of her own beside the owner's exact data,
more computations at once than allowed and a computation longer than
allowed; the owner changes the file under the running server, breaks it
(also with nesting, sizes and numbers no parser or protocol should meet)
and mends it. Every refusal is a 4xx problem
document or a failed job whose error explains itself, and nothing is
released.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _processes import wait_for

from fdrtd_client import (
    Client,
    Forbidden,
    PartyTimeout,
    ServiceUnavailable,
    TooManyRequests,
)
from fdrtd_server.local import LocalFederation
from fdrtd_server.policy import Policy

pytestmark = pytest.mark.slow

TIMEOUT = 90.0
EDGES = [0.0, 10.0, 20.0, 30.0, 40.0]
# bins [0,10): 3, [10,20): none, [20,30): 25, [30,40]: 12
PATIENTS = np.concatenate([np.full(3, 5.0), np.full(25, 25.0), np.full(12, 35.0)])
SMALL = np.arange(1.0, 21.0)
POLICY = """\
version = "v1"

[datasets.patients]
functions = ["map.aggregate", "smpc.histogram", "smpc.count"]
small_cell = 10

[datasets.patients.privacy]
dp = false

[datasets.patients.bounds]
value = [0, 40]

[datasets.small]
min_cohort = 50
analyst_inputs = true

[datasets.small.privacy]
dp = false
"""


class World:
    def __init__(self, local: LocalFederation) -> None:
        self.local = local
        self.servers = local.servers

    def analyst(self, name: str, start_wait: float = 0.25) -> Client:
        server = self.servers[name]
        return Client(server.url, server.token, timeout=TIMEOUT, start_wait=start_wait)

    def policy(self, name: str, text: str) -> None:
        self.servers[name].write_policy(text)

    def audit(self, name: str) -> list[dict[str, Any]]:
        log = self.servers[name].home / "audit.log"
        return [json.loads(line) for line in log.read_text("utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("policy")
    # waits for a party that never joins last until the test ends them, not a clock
    env = {"FDRTD_SESSION_TIMEOUT": "600"}
    with LocalFederation(root, env=env, policy={"alpha": POLICY}) as local:
        world = World(local)
        owner = Client(local.servers["alpha"].url, local.servers["alpha"].owner_token)
        for name, values in (("patients", PATIENTS), ("small", SMALL)):
            owner.publish(owner.upload(values), name)
            owner.grant(name, "analyst")
        yield world


def session(*parties: str) -> dict[str, Any]:
    return {"id": secrets.token_urlsafe(16), "parties": list(parties)}


def test_a_function_the_datasets_policy_forbids_is_refused_before_anything_runs(
    world: World,
) -> None:
    world.policy("alpha", POLICY)
    with pytest.raises(Forbidden) as caught:
        world.analyst("alpha").compute(
            "smpc", "secure_sum", session("alpha", "beta"), data="patients", column="value"
        )
    detail = caught.value.detail
    assert "policy of dataset 'patients'" in detail and "'smpc.secure_sum'" in detail
    assert "map.aggregate, smpc.histogram, smpc.count" in detail
    refused = [r for r in world.audit("alpha") if r["action"] == "compute"][-1]
    assert refused["target"] == "smpc.secure_sum" and refused["outcome"] == "refused 403"
    # the same function on her own upload is hers to run
    own = world.analyst("alpha", start_wait=30).upload(PATIENTS)
    assert world.analyst("alpha", 30).compute("map", "aggregate", data=own).result(TIMEOUT)


def test_a_query_under_the_datasets_minimum_cohort_is_refused_on_every_party(
    world: World,
) -> None:
    world.policy("alpha", POLICY)
    alone = world.analyst("alpha").compute("map", "aggregate", data="small", column="value")
    with pytest.raises(Forbidden, match="minimum cohort of 50"):
        alone.result(TIMEOUT)
    assert "value" not in alone.status()
    # jointly 40 records, under alpha's 50: beta refuses too, from alpha's declaration
    spec = session("alpha", "beta")
    mine = world.analyst("beta").upload(SMALL)
    jobs = [
        world.analyst("alpha").compute("smpc", "count", spec, data="small"),
        world.analyst("beta").compute("smpc", "count", spec, data=mine),
    ]
    for job in jobs:
        with pytest.raises(Forbidden, match="minimum cohort of 50"):
            job.result(TIMEOUT)
        assert "value" not in job.status()


def test_small_and_empty_cells_of_a_named_dataset_are_hidden_alike(world: World) -> None:
    world.policy("alpha", POLICY)
    local = (
        world.analyst("alpha", 30)
        .compute("map", "aggregate", data="patients", column="value", bins=EDGES)
        .result(TIMEOUT)["histogram"]
    )
    # 3 and the empty bin and "other" are under 10; 12 is hidden with them
    assert local["counts"] == [None, None, 25, None] and local["other"] is None
    # beside an upload of the analyst's only where the owner accepts analyst inputs
    world.policy("alpha", POLICY.replace("small_cell = 10\n", OPEN_TO_ANALYSTS))
    spec = session("alpha", "beta")
    theirs = world.analyst("beta").upload(np.full(20, 25.0))
    jobs = [
        world.analyst("alpha").compute(
            "smpc", "histogram", spec, data="patients", column="value", bins=EDGES
        ),
        world.analyst("beta").compute(
            "smpc", "histogram", spec, data=theirs, column="value", bins=EDGES
        ),
    ]
    for job in jobs:  # beta follows alpha's threshold and hides empty cells too
        joint = job.result(TIMEOUT)
        assert joint["counts"] == [None, None, 45, None] and joint["other"] is None
        assert joint["total"] == 60
    world.policy("alpha", POLICY)


OPEN_TO_ANALYSTS = "small_cell = 10\nanalyst_inputs = true\n"
"""The line of ``[datasets.patients]`` that lets the analyst's uploads meet its exact data."""
# the reviewer's column (F1): bins [0,10): 1, [10,20): none, [20,30): 25, [30,40]: 12, 2 outside
REVIEWED = np.concatenate([[5.0], np.full(25, 25.0), np.full(12, 35.0), [50.0, 60.0]])
PADDING = np.concatenate([np.full(10, v) for v in (5.0, 15.0, 25.0, 35.0, 99.0)])
"""Ten records of the analyst's own in every bin and outside: no joint cell is small."""


def test_the_analysts_own_padding_beside_an_owners_exact_data_is_refused(world: World) -> None:
    """Review F1: joint cells minus her own padding were the owner's exact small cells."""
    everything = POLICY.replace(
        '["map.aggregate", "smpc.histogram", "smpc.count"]', '["*"]'
    ).replace("[datasets.small]", "[datasets.reviewed]\nsmall_cell = 10\n[datasets.small]")
    everything += "[datasets.reviewed.privacy]\ndp = false\n"
    world.policy("alpha", everything)
    owner = Client(world.servers["alpha"].url, world.servers["alpha"].owner_token)
    if "reviewed" not in {entry["name"] for entry in owner.catalogue()}:
        owner.publish(owner.upload(REVIEWED), "reviewed")
        # a median and a set intersection are record-level: granted by name (custody)
        owner.grant("reviewed", "analyst", functions=["*", "smpc.median", "psi.intersection_size"])
    pad = world.analyst("beta").upload(PADDING)
    tried = [
        ("smpc", "histogram", {"column": "value", "bins": EDGES}),
        ("smpc", "count", {}),
        ("smpc", "secure_sum", {"column": "value"}),
        ("smpc", "univariate", {"column": "value"}),
        ("smpc", "median", {"column": "value"}),
        ("smpc", "linear_regression", {"x": ["value"], "y": "value"}),
        ("smpc", "contingency_table", {"x": "value", "y": "value"} | CATEGORIES),
        ("psi", "intersection_size", {"column": "value"}),
    ]
    for microservice, function, inputs in tried:
        spec = session("alpha", "beta")
        jobs = [
            world.analyst("alpha").compute(microservice, function, spec, data="reviewed", **inputs),
            world.analyst("beta").compute(microservice, function, spec, data=pad, **inputs),
        ]
        for job in jobs:  # every party refuses, from the same declarations
            with pytest.raises(Forbidden) as caught:
                job.result(TIMEOUT)
            detail = caught.value.detail
            assert "dataset 'reviewed' (on party 'alpha')" in detail, (function, detail)
            assert "analyst_inputs = false" in detail and "'beta'" in detail, detail
            assert "value" not in job.status()
    # the catalogue tells the analyst before she tries
    listed = {entry["name"]: entry for entry in world.analyst("alpha").catalogue()}
    assert listed["reviewed"]["policy"]["analyst_inputs"] is False
    # an owner who accepts analyst inputs accepts that she subtracts them
    accepting = everything.replace(
        "[datasets.reviewed]\n", "[datasets.reviewed]\nanalyst_inputs = true\n"
    )
    world.policy("alpha", accepting)
    spec = session("alpha", "beta")
    bins = {"column": "value", "bins": EDGES}
    jobs = [
        world.analyst("alpha").compute("smpc", "histogram", spec, data="reviewed", **bins),
        world.analyst("beta").compute("smpc", "histogram", spec, data=pad, **bins),
    ]
    joint = [job.result(TIMEOUT) for job in jobs][1]
    assert [c - 10 for c in joint["counts"]] == [1, 0, 25, 12]
    world.policy("alpha", POLICY)


CATEGORIES = {"x_categories": [5.0, 25.0], "y_categories": [5.0, 25.0]}


def test_results_state_the_policy_version_and_the_catalogue_the_rules(world: World) -> None:
    world.policy("alpha", POLICY)
    job = world.analyst("alpha", 30).compute("map", "aggregate", data="patients", column="value")
    job.result(TIMEOUT)
    assert job.status()["policy_version"] == Policy.parse(POLICY).version
    listed = {entry["name"]: entry for entry in world.analyst("alpha").catalogue()}
    patients = listed["patients"]["policy"]
    assert patients["functions"] == ["map.aggregate", "smpc.histogram", "smpc.count"]
    assert patients["small_cell"] == 10 and patients["min_cohort"] == 3
    assert patients["dp"] is False and patients["bounds"] == {"value": [0.0, 40.0]}
    assert listed["small"]["policy"]["min_cohort"] == 50
    assert listed["patients"]["policy_version"] == Policy.parse(POLICY).version


def test_a_change_applies_to_the_next_request_and_is_audited(world: World) -> None:
    world.policy("alpha", POLICY)
    analyst = world.analyst("alpha", 30)
    analyst.compute("map", "aggregate", data="patients", column="value").result(TIMEOUT)
    changed = POLICY.replace('"map.aggregate", ', "")
    world.policy("alpha", changed)
    with pytest.raises(Forbidden, match=r"does not allow 'map\.aggregate'"):
        analyst.compute("map", "aggregate", data="patients", column="value")
    # broken: nothing is computed, the listing goes on, the refusal is audited once
    broken = POLICY.replace("small_cell = 10", "small_cell = ten")
    world.policy("alpha", broken)
    for _ in range(2):
        with pytest.raises(ServiceUnavailable, match="policy file is invalid"):
            analyst.compute("map", "aggregate", data="patients", column="value")
    assert analyst.catalogue()[0]["policy"] is None
    world.policy("alpha", POLICY)  # mended: the next request is served
    analyst.compute("map", "aggregate", data="patients", column="value").result(TIMEOUT)
    records = [r for r in world.audit("alpha") if r["action"] == "policy"]
    assert all(r["principal"] == "owner-policy" for r in records)
    tail = records[-3:]
    assert tail[0]["target"] == Policy.parse(changed).version
    assert tail[0]["changed"] == "patients" and "added" not in tail[0]
    assert tail[1]["outcome"] == "refused" and tail[1]["line"] == 5
    assert tail[2]["target"] == Policy.parse(POLICY).version
    assert all("map.aggregate" not in json.dumps(r) for r in records)  # names, never values
    verify = subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "audit", "verify", str(world.servers["alpha"].home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # reviews F3 and F4: a RecursionError was a 500 without an audit record, and a
        # 20-digit count passed, then broke every computation with a 400 to the analyst
        ('version = "1"\n[defaults]\nbounds = ' + "{a=" * 3000 + "1" + "}" * 3000, "nested"),
        (POLICY + "[defaults]\nmax_concurrent = 99999999999999999999\n", "2147483647"),
        (POLICY + "[defaults]\nsmall_cell = 9223372036854775807\n", "2147483647"),
        (POLICY + "#" * (1 << 20) + "\n", "larger than 1048576 bytes"),
        (None, "cannot be read"),  # a directory where the file should be
    ],
)
def test_a_file_no_parser_or_protocol_should_meet_stops_computations_503_and_is_audited(
    world: World, text: str | None, reason: str
) -> None:
    path = world.servers["alpha"].home / "policy.toml"
    if text is None:
        path.unlink()
        path.mkdir()
    else:
        world.policy("alpha", text)
    analyst = world.analyst("alpha", 30)
    try:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable, match="policy file is invalid") as caught:
                analyst.compute("map", "aggregate", data="patients", column="value")
            assert caught.value.status == 503
        refused = [r for r in world.audit("alpha") if r["action"] == "policy"][-1]
        assert refused["outcome"] == "refused" and reason in refused["reason"], refused
        # the analyst's own computations elsewhere go on
        beta = world.analyst("beta", 30)
        assert beta.compute("map", "aggregate", data=beta.upload(SMALL)).result(TIMEOUT)
    finally:
        if text is None:
            path.rmdir()
        world.policy("alpha", POLICY)
    analyst.compute("map", "aggregate", data="patients", column="value").result(TIMEOUT)


def test_more_computations_at_once_than_the_policy_allows_are_refused_429(world: World) -> None:
    world.policy("gamma", 'version = "limits"\n[defaults]\nmax_concurrent = 2\n')
    gamma, beta = world.analyst("gamma"), world.analyst("beta")
    mine, theirs = gamma.upload(SMALL), beta.upload(SMALL)
    first = session("gamma", "beta")
    # waits for beta, which is not asked yet: running by condition
    waiting = [gamma.compute("smpc", "count", first, data=mine)]
    assert waiting[0].status()["status"] == "running"
    quick = world.analyst("gamma", start_wait=30)
    for _ in range(3):  # each ended within ?wait=, so each is counted off at once
        assert quick.compute("map", "aggregate", data=mine).result(TIMEOUT)["count"] == 20
    second = session("gamma", "beta")
    waiting.append(gamma.compute("smpc", "count", second, data=mine))
    with pytest.raises(TooManyRequests) as caught:
        gamma.compute("smpc", "count", session("gamma", "beta"), data=mine)
    assert caught.value.status == 429 and "max_concurrent = 2" in caught.value.detail
    # beta joins the first: it ends, and the next is admitted
    beta.compute("smpc", "count", first, data=theirs).result(TIMEOUT)
    assert waiting[0].result(TIMEOUT) == {"count": 40}
    third = session("gamma", "beta")
    waiting.append(gamma.compute("smpc", "count", third, data=mine))
    for spec, job in zip((second, third), waiting[1:], strict=True):
        beta.compute("smpc", "count", spec, data=theirs).result(TIMEOUT)
        assert job.result(TIMEOUT) == {"count": 40}
    world.policy("gamma", 'version = "open"\n')


def test_a_computation_past_the_whole_job_timeout_fails_on_every_party(world: World) -> None:
    world.policy("alpha", 'version = "short"\n[defaults]\njob_timeout = 1\n')
    spec = session("alpha", "beta", "gamma")  # gamma never joins
    jobs = {
        name: world.analyst(name).compute(
            "smpc", "count", spec, data=world.analyst(name).upload(SMALL)
        )
        for name in ("alpha", "beta")
    }
    with pytest.raises(PartyTimeout) as alpha:
        jobs["alpha"].result(TIMEOUT)
    assert alpha.value.status == 504
    assert "whole-job timeout of 1 s set by this server's policy" in alpha.value.detail
    # beta waits for gamma for 10 minutes, but alpha told it why it stopped
    with pytest.raises(PartyTimeout) as beta:
        jobs["beta"].result(TIMEOUT)
    assert "party 'alpha' ended the computation" in beta.value.detail
    assert "whole-job timeout" in beta.value.detail
    for job in jobs.values():
        assert "value" not in job.status()

    def ended() -> list[dict[str, Any]]:
        handle = jobs["alpha"].handle
        return [
            r for r in world.audit("alpha") if r["action"] == "job-end" and r["target"] == handle
        ]

    wait_for(lambda: bool(ended()), "alpha's audit of the job's end")
    assert ended()[0]["error_status"] == 504 and ended()[0]["error_class"] == "JobTimeout"
    world.policy("alpha", POLICY)
