"""The ``smpc`` microservice object that every protocol module registers on."""

from __future__ import annotations

from fdrtd_server.microservice import Microservice, distribution_version

__all__ = ["service"]

service = Microservice(
    "smpc",
    distribution_version("fdrtd", "0.1.0"),
    "Secure multiparty computation: sums, extremes, statistics, tables, regression, order.",
    multiparty=True,
)
