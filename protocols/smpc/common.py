"""What every module of the ``smpc`` microservice shares: the service object, common outputs.

:mod:`protocols.smpc.service` (the entry point) imports every protocol
module, and each module registers its functions on :data:`service` when
imported; the modules import from here and from :mod:`fdrtd_server.sdk`,
never from :mod:`protocols.smpc.service`, so the package has no import cycle.
"""

from __future__ import annotations

from fdrtd_server.sdk import Microservice, Output, distribution_version

__all__ = ["COUNT", "VALUE", "service"]

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
