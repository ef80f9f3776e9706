"""Every function declares its inputs; the server refuses what a declaration does not allow.

Against real servers over real HTTP: a misspelled, unknown, missing,
mistyped or out-of-range input is a 400 from ``POST /v1/compute`` whose
detail names the input and lists the accepted ones, before anything runs.
A multi-party function refused at one party ends the computation for the
others with that party's reason, not with a timeout. ``/v1/openapi.json``
describes each function's inputs (``additionalProperties: false``) and
result, read from the microservices' endpoint metadata, and the functions
section of ``docs/api.md`` is what ``python -m fdrtd_server.openapi
--markdown`` makes of it.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from fdrtd_client.errors import BadRequest, ComputationFailed
from fdrtd_server import openapi
from fdrtd_server.config import Settings
from fdrtd_server.inputs import Input, Signature
from fdrtd_server.local import LocalFederation, LocalServer
from fdrtd_server.microservice import Microservice, discover

RESULT_TIMEOUT = 45.0
API_MD = Path(__file__).parents[2] / "docs" / "api.md"


def compute(server: LocalServer, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        server.url + "/v1/compute",
        json=body,
        headers={"authorization": f"Bearer {server.token}"},
        timeout=30,
    )


def refused(response: requests.Response, *mentions: str) -> str:
    """``response`` is a 400 problem whose detail names every one of ``mentions``."""
    assert response.status_code == 400, response.text[:300]
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for mention in mentions:
        assert mention in detail, detail
    return detail


@pytest.fixture(scope="module")
def handle(server: LocalServer) -> str:
    data = server.client().upload({"v": np.arange(10.0), "w": np.arange(10.0) * 2})
    return str(data)


def session(trio: LocalFederation) -> dict[str, Any]:
    return {"id": secrets.token_urlsafe(16), "parties": list(trio.servers)}


# -- misspelled and unknown inputs ------------------------------------------------------------


def test_misspelled_median_input_is_400_naming_it_and_the_accepted_ones(
    server: LocalServer, trio: LocalFederation, handle: str
) -> None:
    body = {
        "microservice": "smpc",
        "function": "median",
        "inputs": {"data": handle, "probabilty": 0.5},
        "session": session(trio),
    }
    refused(compute(server, body), "'probabilty'", "'smpc.median'", "convention", "column")


def test_vertical_regression_with_columns_instead_of_x_is_400(
    server: LocalServer, trio: LocalFederation, handle: str
) -> None:
    body = {
        "microservice": "smpc",
        "function": "linear_regression_vertical",
        "inputs": {"data": handle, "id": "v", "columns": ["w"], "y": "w"},
        "session": session(trio),
    }
    refused(compute(server, body), "'columns'", "x (optional)", "target_holder")


def test_unknown_input_of_a_local_function_is_400(server: LocalServer, handle: str) -> None:
    body = {"microservice": "map", "function": "aggregate", "inputs": {"data": handle, "bin": [1]}}
    refused(compute(server, body), "'bin'", "bins (optional)")


def test_missing_required_input_is_400(server: LocalServer) -> None:
    body = {"microservice": "map", "function": "aggregate", "inputs": {"column": "v"}}
    refused(compute(server, body), "'data'", "data (required)")


@pytest.mark.parametrize(
    ("inputs", "mentions"),
    [
        ({"steps": 0}, ("'steps'", "from 1 to 100")),
        ({"steps": 2.5}, ("'steps'", "an integer")),
        ({"steps": True}, ("'steps'", "an integer")),
        ({"factor": "two"}, ("'factor'", "a number")),
        ({"column": 5}, ("'column'", "a string")),
    ],
    ids=repr,
)
def test_wrong_type_or_range_is_400_before_the_function_runs(
    server: LocalServer, handle: str, inputs: dict[str, Any], mentions: tuple[str, ...]
) -> None:
    body = {"microservice": "example", "function": "scaled_sum", "inputs": {"data": handle}}
    body["inputs"].update(inputs)
    refused(compute(server, body), *mentions)


def test_a_multi_party_function_without_a_session_is_400(server: LocalServer, handle: str) -> None:
    body = {"microservice": "smpc", "function": "secure_sum", "inputs": {"data": handle}}
    refused(compute(server, body), "'smpc.secure_sum' is a multi-party protocol", "'session'")


def test_the_python_client_gets_the_refusal_at_once(server: LocalServer, handle: str) -> None:
    with pytest.raises(BadRequest) as caught:
        server.client().compute("map", "aggregate", data=handle, colum="v")
    assert "'colum'" in caught.value.detail and "column (optional)" in caught.value.detail


def test_declared_inputs_still_compute(server: LocalServer, handle: str) -> None:
    job = server.client().compute("example", "scaled_sum", data=handle, column="w", factor=0.5)
    assert job.result(RESULT_TIMEOUT, progress=False) == {"sum": 45.0}


# -- one party refused: the others hear why ---------------------------------------------------


def test_a_party_refused_by_its_declaration_ends_the_session_for_all(
    trio: LocalFederation,
) -> None:
    spec = session(trio)
    jobs = []
    for name in ("beta", "gamma"):
        client = trio.servers[name].client()
        data = client.upload(np.arange(5.0))
        jobs.append(client.compute("smpc", "median", session=spec, data=data))
    alpha = trio.servers["alpha"].client()
    data = alpha.upload(np.arange(5.0))
    with pytest.raises(BadRequest) as caught:
        alpha.compute("smpc", "median", session=spec, data=data, convention="middle")
    assert "'convention'" in caught.value.detail
    for job in jobs:
        # not a timeout (504): alpha told them, with its reason
        with pytest.raises(ComputationFailed) as failed:
            job.result(RESULT_TIMEOUT, progress=False)
        assert "party 'alpha'" in failed.value.detail
        assert "'convention'" in failed.value.detail


# -- the declarations themselves --------------------------------------------------------------


def test_every_function_declares_its_inputs(example_plugin: None) -> None:
    found = discover()
    assert {"data", "map", "smpc", "psi", "example"} <= set(found)
    for name, spec in found.items():
        for function in spec.functions:
            signature = spec.signatures[function]
            assert signature.declared, f"{name}.{function} declares no inputs"
            assert signature.description, f"{name}.{function} has no description"
            for item in signature.inputs or ():
                assert item.description, f"{name}.{function}: '{item.name}' is not described"


def test_a_function_without_declaration_takes_any_inputs() -> None:
    spec = Microservice("legacy", "1.0.0", "A plugin written before declarations.")

    @spec.job("anything")
    async def anything(ctx: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Takes whatever it is given."""
        return {}

    signature = spec.signatures["anything"]
    assert not signature.declared
    signature.validate({"whatever": [1, 2], "else": None}, "'legacy.anything'")
    assert signature.inputs_schema() == {"type": "object", "description": "not declared: any map"}


def test_declarations_are_checked_when_registered() -> None:
    with pytest.raises(ValueError, match="unknown type"):
        Input("x", "float", "a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="declared twice"):
        Signature(inputs=(Input("x", "number", "a"), Input("x", "number", "b")))


def test_signatures_survive_the_endpoint_metadata(example_plugin: None) -> None:
    for spec in discover().values():
        for signature in spec.signatures.values():
            assert Signature.from_dict(signature.to_dict()) == signature


# -- the OpenAPI document and docs/api.md -----------------------------------------------------


def test_openapi_describes_each_function(server: LocalServer) -> None:
    spec = requests.get(server.url + "/v1/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    median = schemas["Compute.smpc.median"]
    assert median["properties"]["microservice"] == {"const": "smpc"}
    assert median["properties"]["function"] == {"const": "median"}
    assert median["required"] == ["microservice", "function", "inputs", "session"]
    assert median["additionalProperties"] is False
    inputs = median["properties"]["inputs"]
    assert inputs["additionalProperties"] is False
    assert inputs["required"] == ["data"]
    assert set(inputs["properties"]) == {"data", "column", "convention"}
    assert inputs["properties"]["convention"]["anyOf"][0] == {"enum": ["average", "lower", "upper"]}
    assert set(schemas["Result.smpc.median"]["properties"]) == {"median", "convention", "count"}
    # a plugin's functions too, read from its endpoints' metadata; calls cannot be started
    assert "Compute.example.scaled_sum" in schemas
    assert "Compute.example.version" not in schemas
    assert "Compute.data.register" not in schemas
    body = spec["paths"]["/v1/compute"]["post"]["requestBody"]["content"]["application/json"]
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in body["schema"]["oneOf"]}
    assert {"Compute.smpc.median", "Compute.map.aggregate", "Compute.psi.union"} <= refs


def test_docs_api_md_is_up_to_date_with_the_generator() -> None:
    text = API_MD.read_text()
    spec = openapi.document(Settings(home=Path("."), name="docs"), openapi.builtin_functions())
    expected = openapi.update_markdown(text, openapi.markdown(spec))
    assert text == expected, (
        "docs/api.md is out of date: run python -m fdrtd_server.openapi --write docs/api.md"
    )
