"""STAND-IN for the SDK facade of issue 13, on branch sdk/kit only: DROP AT MERGE.

H-SDK writes the real ``fdrtd_server/sdk/__init__.py`` (with ``ring``,
``curve``, ``smpc``, ``parties``, ``disclosure`` moved in). This file only
re-exports, from where they live today, the facade names of
``/work/sdk-plan.md`` that the testing kit and the example plugin
(``examples/vector_mean``) use, so that they can be written and tested
against ``from fdrtd_server.sdk import ...`` before the real facade exists.
At merge take H-SDK's file wholesale.
"""

from __future__ import annotations

from typing import Any

from fdrtd_client import wire
from fdrtd_server.errors import (
    BadRequest,
    CohortTooSmall,
    ComputationFailed,
    Conflict,
    FdrtdError,
    Forbidden,
    NotFound,
    OutOfRange,
    PartyTimeout,
    PayloadTooLarge,
    PluginError,
    ServiceUnavailable,
)
from fdrtd_server.inputs import COLUMN, DATA, Input, Output
from fdrtd_server.lifeline import exit_with
from fdrtd_server.microservice import (
    CallContext,
    Dataset,
    JobContext,
    Microservice,
    distribution_version,
)
from fdrtd_server.peers import PeerSession, both
from protocols._namespace import Namespace
from protocols.psi import curve
from protocols.smpc import ring
from protocols.smpc.engine import SmpcSession, points_from
from protocols.smpc.service import (
    agree,
    check_joint_cohort,
    declare,
    finite_result,
    finite_rows,
    joint_count,
    numeric,
    vet_declared,
)
from protocols.smpc.service import session_for as _server_session

__all__ = [
    "COLUMN",
    "DATA",
    "BadRequest",
    "CallContext",
    "CohortTooSmall",
    "ComputationFailed",
    "Conflict",
    "Dataset",
    "FdrtdError",
    "Forbidden",
    "Input",
    "JobContext",
    "Microservice",
    "Namespace",
    "NotFound",
    "OutOfRange",
    "Output",
    "PartyTimeout",
    "PayloadTooLarge",
    "PeerSession",
    "PluginError",
    "ServiceUnavailable",
    "SmpcSession",
    "agree",
    "both",
    "check_joint_cohort",
    "curve",
    "declare",
    "distribution_version",
    "exit_with",
    "finite_result",
    "finite_rows",
    "joint_count",
    "numeric",
    "points_from",
    "ring",
    "session_for",
    "vet_declared",
    "wire",
]


def session_for(ctx: JobContext) -> PeerSession:
    """The peer session of a multi-party job: the context's own (testing kit) or the real one."""
    own: Any = getattr(ctx, "peer_session", None)
    if own is not None:
        session: PeerSession = own()
        return session
    return _server_session(ctx)
