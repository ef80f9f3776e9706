"""What a hostile client sends, over real HTTP: results that overflow, nulls, odd declarations.

* A result that would hold an infinity is refused with a 422 naming the
  cause (``map.aggregate``, ``smpc.quantiles``, ``smpc.median``), and a JSON
  read of a result that holds one anyway (an order statistic of infinite
  data) is a 200 with ``null`` there, never a 500.
* An optional input sent as ``null`` is "not given": the function uses its
  default (``smpc.secure_sum`` ``frac_bits``, the regressions' options,
  ``smpc.median`` ``convention``, the example plugin's ``factor``).
"""

from __future__ import annotations

import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest
import requests

from fdrtd_server.local import LocalFederation, LocalServer

WAIT = 45
BIG = 1.7e308


def post(server: LocalServer, path: str, **kwargs: Any) -> requests.Response:
    headers = {"authorization": f"Bearer {server.token}", **kwargs.pop("headers", {})}
    return requests.post(server.url + path, headers=headers, timeout=WAIT + 30, **kwargs)


def get(server: LocalServer, path: str, **headers: str) -> requests.Response:
    headers = {"authorization": f"Bearer {server.token}", **headers}
    return requests.get(server.url + path, headers=headers, timeout=WAIT + 30)


def upload(server: LocalServer, columns: dict[str, Any]) -> str:
    answer = post(server, "/v1/data?format=json", json=columns)
    assert answer.status_code == 201, answer.text[:300]
    handle: str = answer.json()["handle"]
    return handle


def compute(server: LocalServer, body: dict[str, Any]) -> dict[str, Any]:
    """Start a computation and wait for its end; the answer must be a 200 (a finished view)."""
    answer = post(server, f"/v1/compute?wait={WAIT}", json=body)
    assert answer.status_code == 200, answer.text[:300]
    view: dict[str, Any] = answer.json()
    return view


def jointly(
    trio: LocalFederation, function: str, inputs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Run ``smpc.function`` on the parties named in ``inputs`` (in threads), as raw HTTP."""
    spec = {"id": secrets.token_urlsafe(16), "parties": list(inputs)}

    def one(party: str) -> dict[str, Any]:
        body = {"microservice": "smpc", "function": function, "inputs": inputs[party]}
        return compute(trio.servers[party], {**body, "session": spec})

    with ThreadPoolExecutor(len(inputs)) as pool:
        return dict(zip(inputs, pool.map(one, inputs), strict=True))


def failed_with(view: dict[str, Any], status: int, *mentions: str) -> None:
    assert view["status"] == "failed", view
    assert view["error"]["status"] == status, view
    for mention in mentions:
        assert mention in view["error"]["detail"], view


# -- 1. non-finite results --------------------------------------------------------------------


def test_an_aggregate_that_overflows_is_422_and_every_read_is_well_formed(
    server: LocalServer,
) -> None:
    handle = upload(server, {"v": [BIG] * 12})
    view = compute(
        server, {"microservice": "map", "function": "aggregate", "inputs": {"data": handle}}
    )
    failed_with(view, 422, "'sum'", "'map.aggregate'", "overflowed", "scale the data down")
    for accept in ("application/json", "application/msgpack"):
        read = get(server, f"/v1/results/{view['result']}", accept=accept)
        assert read.status_code == 200, read.text[:300]


def test_quantiles_and_median_that_overflow_are_422_on_every_party(trio: LocalFederation) -> None:
    handles = {
        "alpha": upload(trio.servers["alpha"], {"v": [-BIG] * 6}),
        "beta": upload(trio.servers["beta"], {"v": [BIG] * 6}),
    }
    views = jointly(
        trio,
        "quantiles",
        {p: {"data": h, "probabilities": [0.5, 0.25]} for p, h in handles.items()},
    )
    for view in views.values():
        failed_with(view, 422, "'quantiles'", "overflowed")
    # the median of 12 is the mean of ranks 6 and 7: -BIG and BIG give 0, no overflow
    views = jointly(trio, "median", {p: {"data": h} for p, h in handles.items()})
    assert [view["value"]["median"] for view in views.values()] == [0.0, 0.0]
    # but BIG and BIG overflow when added
    both_big = {p: upload(trio.servers[p], {"v": [BIG] * 6}) for p in handles}
    views = jointly(trio, "median", {p: {"data": h} for p, h in both_big.items()})
    for view in views.values():
        failed_with(view, 422, "'median'", "'smpc.median'", "overflowed")


def test_a_result_holding_an_infinity_reads_as_null_in_json_and_as_the_float_in_msgpack(
    trio: LocalFederation,
) -> None:
    # an order statistic of infinite data is the infinity itself (a data value, not an overflow)
    handles = {p: upload(trio.servers[p], {"v": [1.0] * 5}) for p in ("alpha", "beta")}
    infinite = trio.servers["alpha"].client().upload(np.array([math.inf] * 5))
    handles["alpha"] = str(infinite)
    views = jointly(trio, "kth_smallest", {p: {"data": h, "k": 10} for p, h in handles.items()})
    alpha = views["alpha"]
    assert alpha["status"] == "done", alpha
    assert alpha["value"]["value"] is None  # JSON has no infinity
    read = get(trio.servers["alpha"], f"/v1/results/{alpha['result']}")
    assert read.status_code == 200 and read.json()["value"]["value"] is None
    packed = get(
        trio.servers["alpha"], f"/v1/results/{alpha['result']}", accept="application/msgpack"
    )
    assert msgpack.unpackb(packed.content)["value"]["value"] == math.inf


# -- 2. null means "not given" ----------------------------------------------------------------


def test_secure_sum_with_frac_bits_null_uses_the_default(trio: LocalFederation) -> None:
    handles = {p: upload(trio.servers[p], {"v": [1.5] * 5}) for p in ("alpha", "beta")}
    views = jointly(
        trio, "secure_sum", {p: {"data": h, "frac_bits": None} for p, h in handles.items()}
    )
    for view in views.values():
        assert view["status"] == "done", view
        assert view["value"]["sum"] == 15.0


def test_median_with_convention_null_uses_the_default(trio: LocalFederation) -> None:
    handles = {
        p: upload(trio.servers[p], {"v": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}) for p in ("alpha", "beta")
    }
    views = jointly(
        trio, "median", {p: {"data": h, "convention": None} for p, h in handles.items()}
    )
    for view in views.values():
        assert view["status"] == "done", view
        assert view["value"]["convention"] == "average"


@pytest.mark.parametrize(
    ("function", "nulls"),
    [
        ("logistic_regression", {"tolerance": None, "max_iterations": None}),
        ("linear_regression", {"intercept": None}),
    ],
)
def test_regression_options_sent_as_null_use_their_defaults(
    trio: LocalFederation, function: str, nulls: dict[str, Any]
) -> None:
    rng = np.random.default_rng(7)
    handles = {}
    for party in ("alpha", "beta"):
        x = rng.normal(size=40)
        y = (x + rng.normal(size=40) > 0).astype(float) if "logistic" in function else 2 * x + 1
        handles[party] = upload(trio.servers[party], {"x": x.tolist(), "y": y.tolist()})
    views = jointly(
        trio, function, {p: {"data": h, "x": ["x"], "y": "y", **nulls} for p, h in handles.items()}
    )
    for view in views.values():
        assert view["status"] == "done", view


def test_a_plugin_option_sent_as_null_uses_its_default(server: LocalServer) -> None:
    handle = upload(server, {"v": [1.0] * 10})
    inputs = {"data": handle, "factor": None, "steps": None, "delay": None}
    view = compute(server, {"microservice": "example", "function": "scaled_sum", "inputs": inputs})
    assert view["status"] == "done", view
    assert view["value"] == {"sum": 10.0}
