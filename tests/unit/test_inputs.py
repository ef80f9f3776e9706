"""The declaration of a function's inputs: the rules it checks and the schema it gives.

:mod:`fdrtd_server.inputs` on its own, without a server: which values an
:class:`Input` keeps, what the refusal says (the input, its rule and the
function, never the value), how whole floats become ints, and that its JSON
Schema accepts no more than the check does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fdrtd_server.errors import BadRequest
from fdrtd_server.inputs import COLUMN, DATA, Input, Output, Signature

WHERE = "'test.function'"
HANDLE = "d-" + "ab" * 20
SECRET = "QZXSECRET"
SIGNATURE = Signature(
    "A test function.",
    inputs=(
        DATA,
        COLUMN,
        Input("k", "integer", "a rank", required=True, minimum=1, maximum=10),
        Input("p", "array", "probabilities", minimum=1, maximum=3, items="number"),
        Input("mode", "string", "how", choices=("a", "b")),
        Input("bits", "integer", "a key size", choices=(2048, 4096)),
        Input("x", ("string", "array"), "one name or several", items="string"),
        Input("flag", "boolean", "a switch", default=False),
    ),
    outputs=(Output("value", "number", "the value"),),
)


def refusal(inputs: dict[str, Any]) -> str:
    with pytest.raises(BadRequest) as caught:
        SIGNATURE.validate(inputs, WHERE)
    assert SECRET not in caught.value.message
    return caught.value.message


def test_good_inputs_pass_and_come_back() -> None:
    inputs = {"data": HANDLE, "k": 3, "p": [0.5], "mode": "a", "x": ["u", "v"], "flag": True}
    assert SIGNATURE.validate(inputs, WHERE) == inputs


def test_optional_inputs_sent_as_null_are_not_given() -> None:
    # null means "not given" (schema and docs): the function gets no key, so its default
    checked = SIGNATURE.validate({"data": HANDLE, "k": 1, "column": None, "flag": None}, WHERE)
    assert checked == {"data": HANDLE, "k": 1}


def test_whole_floats_of_integer_inputs_become_ints() -> None:
    checked = SIGNATURE.validate({"data": HANDLE, "k": 3.0, "bits": 2048.0}, WHERE)
    assert checked["k"] == 3 and isinstance(checked["k"], int)
    assert checked["bits"] == 2048 and isinstance(checked["bits"], int)
    assert "'k'" in refusal({"data": HANDLE, "k": 3.5})


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"colum": SECRET}, ("'colum' is not an input of 'test.function'", "column (optional)")),
        ({"k": None}, ("needs the input 'k'", "an integer from 1 to 10", "k (required)")),
        ({"k": 0}, ("'k' of 'test.function' must be an integer from 1 to 10",)),
        ({"k": True}, ("'k'",)),
        ({"data": SECRET}, ("'data'", "a data handle")),
        ({"p": []}, ("'p'", "a list of numbers (from 1 to 3 items)")),
        ({"p": [SECRET]}, ("'p'",)),
        ({"mode": SECRET}, ("'mode'", "one of 'a', 'b'")),
        ({"bits": True}, ("'bits'", "one of 2048, 4096")),
        ({"x": 5}, ("'x'", "a string or a list of strings")),
        ({"flag": 1}, ("'flag'", "true or false")),
        ({"column": float("nan")}, ("'column'", "a string")),
    ],
    ids=repr,
)
def test_refusals_name_the_input_and_the_rule(
    change: dict[str, Any], mentions: tuple[str, ...]
) -> None:
    inputs: dict[str, Any] = {"data": HANDLE, "k": 2}
    inputs.update(change)
    inputs = {key: value for key, value in inputs.items() if value is not None}
    message = refusal(inputs)
    for mention in mentions:
        assert mention in message, message


def test_a_sent_name_that_is_not_a_name_is_not_repeated() -> None:
    message = refusal({"data": HANDLE, "k": 1, "id 4711 of " + SECRET: 1})
    assert "an input name is not an input of 'test.function'" in message
    assert "4711" not in message


def test_typed_arrays_are_lists() -> None:
    SIGNATURE.validate({"data": HANDLE, "k": 1, "p": np.array([0.1, 0.2])}, WHERE)
    assert "'p'" in refusal({"data": HANDLE, "k": 1, "p": np.array(["a"])})


def test_the_schema_says_what_the_check_does() -> None:
    schema = SIGNATURE.inputs_schema()
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["data", "k"]
    properties = schema["properties"]
    assert properties["k"]["type"] == "integer"
    assert (properties["k"]["minimum"], properties["k"]["maximum"]) == (1, 10)
    assert properties["data"]["pattern"] == "^d-[0-9a-f]{40}$"
    assert properties["mode"]["anyOf"] == [{"enum": ["a", "b"]}, {"type": "null"}]
    p = properties["p"]["anyOf"][0]
    assert p == {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "number"}}
    assert properties["flag"]["default"] is False
    assert SIGNATURE.outputs_schema()["properties"]["value"]["type"] == "number"
