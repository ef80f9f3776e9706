"""Session ids must carry at least 128 bits, so no client can guess or pre-claim another's.

A session id is single use on every server (``fdrtd_sessions``). With short
ids, a client could start a computation under the id another client is about
to use, and the victim's computation would then fail with 409; so the
controller refuses ids shorter than 22 characters (22 random characters of
the URL-safe alphabet are 132 bits; ``secrets.token_urlsafe(16)`` gives 22,
``secrets.token_hex(16)`` 32).
"""

from __future__ import annotations

import secrets

import pytest

from fdrtd_server.errors import BadRequest
from fdrtd_server.routes.compute import _check_session

PARTIES = ["alpha", "beta"]


@pytest.mark.parametrize(
    "sid",
    [
        "abcdefgh",  # the old minimum (8)
        "a" * 21,
        secrets.token_hex(8),  # 16 characters, 64 bits
        secrets.token_hex(10) + "a",  # 21
        "psi-mismatch-1",
        "x" * 65,
        "x" * 21 + ".",
        "x" * 30 + "\n",
    ],
)
def test_short_or_malformed_session_ids_are_refused(sid: str) -> None:
    with pytest.raises(BadRequest, match=r"'session.id' must be 22 to 64 .* 128 bits"):
        _check_session({"id": sid, "parties": PARTIES})


@pytest.mark.parametrize(
    "sid",
    [
        secrets.token_urlsafe(16),  # 22
        secrets.token_hex(16),  # 32: what fdrtd_client.Federation makes
        "sec-" + secrets.token_hex(12),
        "x" * 64,
    ],
)
def test_ids_of_128_bits_are_accepted(sid: str) -> None:
    assert _check_session({"id": sid, "parties": PARTIES}) == {"id": sid, "parties": PARTIES}
