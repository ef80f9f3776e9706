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
    # a data input takes a data handle or a dataset name
    assert properties["data"]["pattern"] == "^(d-[0-9a-f]{40}|[a-z][a-z0-9_-]{0,62})$"
    assert properties["mode"]["anyOf"] == [{"enum": ["a", "b"]}, {"type": "null"}]
    p = properties["p"]["anyOf"][0]
    assert p == {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "number"}}
    assert properties["flag"]["default"] is False
    assert SIGNATURE.outputs_schema()["properties"]["value"]["type"] == "number"


def test_exclusive_bounds_are_refused_and_declared_as_such() -> None:
    tolerance = Input("t", "number", "a tolerance", minimum=0, maximum=1, exclusive=True)
    signature = Signature(inputs=(tolerance,))
    assert signature.validate({"t": 0.5}, WHERE) == {"t": 0.5}
    for edge in (0, 0.0, 1, 1.0):
        with pytest.raises(BadRequest, match=r"'t' of .* must be a number above 0 and below 1"):
            signature.validate({"t": edge}, WHERE)
    schema = tolerance.schema()["anyOf"][0]
    assert schema == {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
    assert Input.from_dict(tolerance.to_dict()) == tolerance


def test_number_choices_are_compared_as_numbers() -> None:
    level = Input("level", "number", "a level", choices=(1, 2.5))
    signature = Signature(inputs=(level,))
    assert signature.validate({"level": 1.0}, WHERE) == {"level": 1.0}
    assert signature.validate({"level": 2.5}, WHERE) == {"level": 2.5}
    with pytest.raises(BadRequest, match="'level'"):
        signature.validate({"level": True}, WHERE)
    with pytest.raises(BadRequest, match="'level'"):
        signature.validate({"level": "1"}, WHERE)


def test_an_integer_without_bounds_has_64_bits_in_check_and_schema() -> None:
    count = Input("n", "integer", "a count")
    signature = Signature(inputs=(count,))
    assert signature.validate({"n": 2**63 - 1}, WHERE) == {"n": 2**63 - 1}
    with pytest.raises(BadRequest, match=r"'n' of .* must be an integer of at most 64 bits"):
        signature.validate({"n": 2**63}, WHERE)
    with pytest.raises(BadRequest, match="'n'"):
        signature.validate({"n": 1e30}, WHERE)  # a JSON number beyond 64 bits, as a float
    schema = count.schema()["anyOf"][0]
    assert (schema["minimum"], schema["maximum"]) == (-(2**63), 2**63 - 1)


def test_typed_arrays_reach_the_function_as_lists() -> None:
    checked = SIGNATURE.validate({"data": HANDLE, "k": 1, "p": np.array([0.1, 0.2])}, WHERE)
    assert checked["p"] == [0.1, 0.2] and isinstance(checked["p"], list)
    assert "'p'" in refusal({"data": HANDLE, "k": 1, "p": np.zeros((2, 2))})


def test_bounds_of_an_input_they_do_not_apply_to_are_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="'minimum' and 'maximum' apply to numbers and arrays"):
        Input("name", "string", "a name", minimum=1, maximum=20)
    with pytest.raises(ValueError, match="only a number has exclusive bounds"):
        Input("p", "array", "a list", minimum=1, exclusive=True)
