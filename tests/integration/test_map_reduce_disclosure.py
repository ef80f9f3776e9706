"""Map-reduce through real servers: the disclosure checks of SMPC apply to local aggregates.

No server releases its own minimum or maximum (single records' values);
histogram cells are suppressed complementarily, so the released count gives
no hidden cell away; non-finite rows are left out as in SMPC.
"""

from __future__ import annotations

import numpy as np

from fdrtd_server.local import LocalFederation

TIMEOUT = 60.0


def test_map_reduce_releases_no_extremes_and_suppresses_complementarily(
    trio: LocalFederation,
) -> None:
    federation = trio.federation()
    data = {
        # one value in [2, 3): alone it would be 21 - 10 - 10 = 1 from the count
        "alpha": [0.5] * 10 + [1.5] * 10 + [2.5, float("inf"), float("nan")],
        "beta": [0.5] * 4 + [1.5] * 5 + [3.5] * 3,
        "gamma": [1.5] * 6 + [-7.0] * 3,
    }
    handles = federation.upload({p: np.array(v) for p, v in data.items()})
    alpha = federation.clients["alpha"]
    part = alpha.compute("map", "aggregate", data=handles["alpha"], bins=[0, 1, 2, 3, 4]).result(
        TIMEOUT
    )
    assert set(part) == {"count", "sum", "sum_squares", "histogram"}
    assert part["count"] == 21  # the infinite and the missing value are left out
    assert part["histogram"]["counts"] == [None, 10, None, 0]
    assert part["histogram"]["suppressed"] == [0, 2]

    result = federation.map_reduce(handles, bins=[0, 1, 2, 3, 4], timeout=TIMEOUT)
    assert "minimum" not in result and "maximum" not in result
    assert result["count"] == 21 + 12 + 9
    finite = [v for vs in data.values() for v in vs if np.isfinite(v)]
    assert result["sum"] == np.sum(finite)
    histogram = result["histogram"]
    # alpha hid [0, 2), [2, 3); beta nothing; gamma's "other" (3 values below 0) is shown
    assert histogram["counts"] == [None, 21, None, 3]
    assert histogram["other"] == 3
    assert histogram["suppressed"] == [0, 2]
