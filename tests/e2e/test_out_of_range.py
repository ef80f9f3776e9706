"""Values beyond a secure protocol's number range end the computation with a clear 422.

A secure sum encodes each party's values as 64-bit fixed-point integers; a
value beyond the range (``|x| * 2^frac_bits * parties < 2^63``, about
2.9e12 for three parties with the default ``frac_bits = 20``) cannot take
part. The party that holds it refuses with a problem that names the input,
the bound and the fix, and tells the others, whose computation fails with
the same reason: every party answers 422, none 500 "internal error".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fdrtd_client.errors import ComputationFailed, ServerError
from fdrtd_server.local import LocalFederation

RESULT_TIMEOUT = 45.0
TOO_LARGE = 1e13
"""Beyond 2^43 / 3 (about 2.9e12), the bound for three parties and 20 fractional bits."""


def failures(
    trio: LocalFederation, data: dict[str, Any], function: str = "secure_sum", **common: Any
) -> list[ServerError]:
    """Run ``smpc.<function>`` on every party; every party's error (none may succeed)."""
    fed = trio.federation(timeout=30)
    handles = fed.upload(data)
    job = fed.compute("smpc", function, {n: {"data": h} for n, h in handles.items()}, **common)

    def one(index: int) -> ServerError:
        with pytest.raises(ServerError) as caught:
            job.jobs[index].result(RESULT_TIMEOUT, progress=False)
        return caught.value

    with ThreadPoolExecutor(len(job.jobs)) as pool:
        return list(pool.map(one, range(len(job.jobs))))


def check(errors: list[ServerError], *mentions: str) -> None:
    for error in errors:
        assert isinstance(error, ComputationFailed), (type(error), error.detail)
        assert error.status == 422
        assert "internal error" not in error.detail
        for mention in mentions:
            assert mention in error.detail, error.detail
        assert "1e+13" not in error.detail and "10000000000000" not in error.detail


def test_one_party_beyond_the_range_fails_every_party_with_the_same_reason(
    trio: LocalFederation,
) -> None:
    data = {name: np.array([1.0, 2.0, 3.0]) for name in trio.servers}
    data["gamma"] = np.array([1.0, TOO_LARGE, 3.0])
    errors = failures(trio, data)
    check(errors, "'data' input is out of range", "frac_bits", "scale the data down")
    # the others learn it from gamma, under gamma's name
    names = list(trio.servers)
    for name, error in zip(names, errors, strict=True):
        if name != "gamma":
            assert "party 'gamma'" in error.detail


def test_every_party_beyond_the_range_is_422(trio: LocalFederation) -> None:
    errors = failures(trio, {name: np.array([TOO_LARGE] * 3) for name in trio.servers})
    check(errors, "out of range", "lower the 'frac_bits' input")


def test_nan_in_an_elementwise_sum_is_422(trio: LocalFederation) -> None:
    data = {name: np.ones(4) for name in trio.servers}
    data["beta"] = np.array([1.0, np.nan, 1.0, 1.0])
    check(failures(trio, data, elementwise=True), "NaN or infinity")


@pytest.mark.parametrize(
    ("function", "common"),
    [("secure_sum", {}), ("univariate", {}), ("bivariate", {"x": "v", "y": "v"})],
)
def test_local_sums_beyond_float64_are_422(
    trio: LocalFederation, function: str, common: dict[str, Any]
) -> None:
    # every value is finite; their sum is not
    data = {name: {"v": np.array([1e308, 1e308, 1e308, 1.0])} for name in trio.servers}
    if function != "bivariate":
        common = {"column": "v"}
    check(failures(trio, data, function, **common), "NaN or infinity", "scale the data down")
