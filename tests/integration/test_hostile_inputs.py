"""What a hostile client sends, over real HTTP: results that overflow, nulls, odd declarations.

* A result that would hold an infinity is refused with a 422 naming the
  cause (``map.aggregate``, ``smpc.quantiles``, ``smpc.median``), and a JSON
  read of a result that holds one anyway (an order statistic of infinite
  data) is a 200 with ``null`` there, never a 500.
* An optional input sent as ``null`` is "not given": the function uses its
  default (``smpc.secure_sum`` ``frac_bits``, the regressions' options,
  ``smpc.median`` ``convention``, the example plugin's ``factor``).
* A plugin whose endpoint metadata holds a broken declaration is described
  as taking any map; ``/v1/openapi.json`` is still served.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
import requests
from nats.micro import add_service
from nats.micro.service import EndpointConfig

from fdrtd_client import wire
from fdrtd_server.inputs import Output, Signature
from fdrtd_server.local import LocalFederation, LocalServer
from fdrtd_server.microservice import SIGNATURE_METADATA

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


# -- 4. a plugin's broken declaration ---------------------------------------------------------

BROKEN = {
    "empty_list": "[]",
    "input_not_a_map": json.dumps({"inputs": [1]}),
    "output_of_unknown_type": json.dumps(
        {"inputs": [], "outputs": [{"name": "x", "type": "float", "description": "a number"}]}
    ),
    "not_json": "{",
}


def test_broken_declarations_of_a_plugin_leave_the_openapi_document_served(
    server: LocalServer,
) -> None:
    """A plugin's endpoints with broken metadata are described as undeclared; no 500."""

    async def scenario() -> requests.Response:
        url = server.nats_url_file.read_text().strip()
        nc = await nats.connect(url)
        try:
            service = await add_service(
                nc,
                name="fdrtd-brokenplugin",
                version="1.0.0",
                description="A plugin with broken declarations.",
                metadata={"fdrtd.microservice": "brokenplugin"},
            )

            async def handler(request: Any) -> None:
                await request.respond(b"")

            for function, text in BROKEN.items():
                await service.add_endpoint(
                    EndpointConfig(
                        name=function,
                        handler=handler,
                        subject=f"test.brokenplugin.{function}",
                        metadata={"kind": "job", SIGNATURE_METADATA: text},
                    )
                )
            try:
                return await asyncio.to_thread(
                    requests.get, server.url + "/v1/openapi.json", timeout=30
                )
            finally:
                await service.stop()
        finally:
            await nc.close()

    answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text[:300]
    schemas = answer.json()["components"]["schemas"]
    for function in BROKEN:
        inputs = schemas[f"Compute.brokenplugin.{function}"]["properties"]["inputs"]
        assert inputs == {"type": "object", "description": "not declared: any map"}
    # the others are described as before
    assert "Compute.smpc.median" in schemas


def test_an_output_of_an_unknown_type_is_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="unknown type 'float'"):
        Output("x", "float", "a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown type 'data'"):
        Output("x", "data", "a handle")
    with pytest.raises(ValueError, match="lowercase"):
        Output("X y", "number", "a number")
    with pytest.raises(ValueError, match="must be an Input"):
        Signature(inputs=(1,))  # type: ignore[arg-type]


# -- 5. the schema and the server agree -------------------------------------------------------


def test_a_tolerance_on_its_bound_is_refused_before_anything_runs(
    server: LocalServer, trio: LocalFederation
) -> None:
    handle = upload(server, {"x": [1.0, 2.0], "y": [0.0, 1.0]})
    spec = {"id": secrets.token_urlsafe(16), "parties": ["alpha", "beta"]}
    inputs = {"data": handle, "x": ["x"], "y": "y", "tolerance": 1}
    body = {"microservice": "smpc", "function": "logistic_regression", "inputs": inputs}
    answer = post(server, "/v1/compute", json={**body, "session": spec})
    assert answer.status_code == 400, answer.text[:300]
    assert "'tolerance'" in answer.json()["detail"]
    assert "above 0 and below 1" in answer.json()["detail"]


def test_an_integer_beyond_64_bits_is_a_number_for_a_number_input(server: LocalServer) -> None:
    handle = upload(server, {"v": [1.0] * 10})
    inputs = {"data": handle, "factor": 10**30}
    view = compute(server, {"microservice": "example", "function": "scaled_sum", "inputs": inputs})
    assert view["status"] == "done", view
    assert view["value"]["sum"] == pytest.approx(1e31)
    # and out of range for an integer input, which says so
    inputs = {"data": handle, "steps": 10**30}
    body = {"microservice": "example", "function": "scaled_sum", "inputs": inputs}
    answer = post(server, "/v1/compute", json=body)
    assert answer.status_code == 400, answer.text[:300]
    assert "'steps'" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("extra", "mentions"),
    [
        ({"wiat": 3}, ("the body has 'wiat'", "microservice, function, inputs, session")),
        ({"session": {"timeout": 3}}, ("'session' has 'timeout'", "id, parties")),
    ],
    ids=repr,
)
def test_unknown_keys_of_the_body_and_session_are_refused(
    server: LocalServer, extra: dict[str, Any], mentions: tuple[str, ...]
) -> None:
    handle = upload(server, {"v": [1.0] * 10})
    body: dict[str, Any] = {"microservice": "smpc", "function": "count", "inputs": {"data": handle}}
    body["session"] = {"id": secrets.token_urlsafe(16), "parties": ["alpha", "beta"]}
    if "session" in extra:
        body["session"].update(extra["session"])
    else:
        body.update(extra)
    answer = post(server, "/v1/compute", json=body)
    assert answer.status_code == 400, answer.text[:300]
    for mention in mentions:
        assert mention in answer.json()["detail"]


def test_typed_arrays_are_accepted_wherever_a_list_is(trio: LocalFederation) -> None:
    probabilities = wire.to_jsonable(np.array([0.25, 0.5]))
    bins = wire.to_jsonable(np.array([0.0, 3.0, 6.0]))
    handles = {
        p: upload(trio.servers[p], {"v": [1.0, 2.0, 3.0, 4.0, 5.0]}) for p in ("alpha", "beta")
    }
    views = jointly(
        trio,
        "quantiles",
        {p: {"data": h, "probabilities": probabilities} for p, h in handles.items()},
    )
    for view in views.values():
        assert view["status"] == "done", view
        assert view["value"]["probabilities"] == [0.25, 0.5]
    views = jointly(trio, "histogram", {p: {"data": h, "bins": bins} for p, h in handles.items()})
    for view in views.values():
        assert view["status"] == "done", view


# -- 6. messages ------------------------------------------------------------------------------


def test_a_bad_shape_names_the_query_parameter_not_the_internal_function(
    server: LocalServer,
) -> None:
    answer = post(server, "/v1/data?format=raw&dtype=<f8&shape=", data=b"\0" * 8)
    assert answer.status_code == 400, answer.text[:300]
    detail = answer.json()["detail"]
    assert "'shape'" in detail and "data.register" not in detail


@pytest.mark.parametrize(
    ("key", "mentions"),
    [(b"v", "one is msgpack binary (bin)"), (7, "a key that is not a string")],
    ids=repr,
)
def test_a_msgpack_upload_with_a_column_name_that_is_no_string_says_so(
    server: LocalServer, key: Any, mentions: str
) -> None:
    body = msgpack.packb({key: [1.0, 2.0]}, use_bin_type=True)
    answer = post(server, "/v1/data?format=msgpack", data=body)
    assert answer.status_code == 400, answer.text[:300]
    detail = answer.json()["detail"]
    assert "not valid msgpack" not in detail and mentions in detail, detail
