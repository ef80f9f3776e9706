"""JSON never meets a float it cannot write: NaN and infinity in answers and in the audit log."""

from __future__ import annotations

import json
import math

import numpy as np

from fdrtd_client import wire


def test_non_finite_floats_are_null_in_json_so_that_strict_json_never_fails() -> None:
    message = {"a": math.inf, "b": [np.float64(-math.inf), np.float32("nan")], "c": 1.5}
    jsonable = wire.to_jsonable(message)
    assert jsonable == {"a": None, "b": [None, None], "c": 1.5}
    json.dumps(jsonable, allow_nan=False)
