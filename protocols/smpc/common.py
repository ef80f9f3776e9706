"""What every module of the ``smpc`` microservice shares: the service object, common outputs.

:mod:`protocols.smpc.service` (the entry point) imports every protocol
module, and each module registers its functions on :data:`service` when
imported; the modules import from here and from :mod:`fdrtd_server.sdk`,
never from :mod:`protocols.smpc.service`, so the package has no import cycle.
"""

from __future__ import annotations

from typing import Any

from fdrtd_server.sdk import BadRequest, Input, Microservice, Output, distribution_version

__all__ = ["COUNT", "PAILLIER_BITS", "PAILLIER_INPUT", "VALUE", "paillier_bits", "service"]

service = Microservice(
    "smpc",
    distribution_version("fdrtd", "0.1.0"),
    "Secure multiparty computation: sums, extremes, statistics, tables, regression, order.",
    multiparty=True,
)

COUNT = Output("count", "integer", "the number of records of all parties the result describes")
"""The ``count`` output of most functions."""
VALUE = "a number, or a typed array for a column of vectors or matrices"
"""How the value outputs of the functions over a column are described."""

PAILLIER_BITS = (2048, 3072, 4096)
"""Paillier modulus sizes a client may ask for; 2048 is the default.

Anything smaller is refused: a 1024-bit modulus can be factored with
public effort. Unit tests that need speed build the protocol's internal
state with a smaller key themselves; no input reaches that path.
"""

PAILLIER_INPUT = Input(
    "paillier_bits",
    "integer",
    "Paillier key size (two parties only); must agree",
    default=PAILLIER_BITS[0],
    choices=PAILLIER_BITS,
)
"""The ``paillier_bits`` input of every function that multiplies under Paillier encryption."""


def paillier_bits(inputs: dict[str, Any]) -> int:
    """The ``paillier_bits`` input (or the default), one of :data:`PAILLIER_BITS`.

    Raises:
        BadRequest: If it is not one of them.
    """
    bits = inputs.get("paillier_bits", PAILLIER_BITS[0])
    if bits not in PAILLIER_BITS or isinstance(bits, bool):
        raise BadRequest(
            f"'paillier_bits' must be one of {', '.join(map(str, PAILLIER_BITS))}"
            " (smaller Paillier keys are not secure)"
        )
    return int(bits)
