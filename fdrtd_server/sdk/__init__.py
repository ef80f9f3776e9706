"""The protocol SDK: everything a microservice plugin imports from fdrtd.

A plugin (and every built-in microservice and protocol of this repository)
imports from ``fdrtd_server`` only this package and its submodules; the
layering is checked by ``lint-imports`` (``[tool.importlinter]`` in
``pyproject.toml``, described in ``docs/architecture.md``). The facade below
is the supported surface, tested name by name in ``tests/unit/test_sdk.py``:

* the plugin interface: :class:`Microservice` and its functions'
  :class:`JobContext` / :class:`CallContext`, the :class:`Dataset` they load,
  the declared :class:`Input` / :class:`Output` of a function;
* the errors a function raises (each carries its HTTP status);
* the parties of a multi-party function (:mod:`fdrtd_server.sdk.parties`):
  its :class:`PeerSession`, what each party declares and all must agree on,
  the joint minimum cohort, the owner's rule on inputs of the caller's
  (:func:`vet_inputs`);
* secure computation: :class:`SmpcSession` (secure sums, OR, maximum) over
  the fixed-point :mod:`ring`, and the Curve25519 primitives of :mod:`curve`;
* protocol stages (:mod:`fdrtd_server.sdk.stages`): a :class:`Stage` names a
  message and declares its :class:`Message` form, and :class:`StagedPeers`
  checks every received message against it before the protocol sees it;
* disclosure rules (:mod:`fdrtd_server.sdk.disclosure`);
* long messages between parties: :func:`send_bytes` and :func:`receive_bytes`
  (:mod:`fdrtd_server.sdk.transfer`), where the receiver knows or caps the size;
* record ids and their private join: :func:`canonical_ids` (one rule for every
  join and set operation, :mod:`fdrtd_server.sdk.ids`) and :func:`join_ids`
  (DH-PSI around the holders, :mod:`fdrtd_server.sdk.join`);
* differential privacy (:mod:`fdrtd_server.sdk.privacy`): a function with a
  private release loads with ``load_dataset(..., private=True)``, clamps to
  the owner's bounds, spends with :func:`private_release` and noises with
  OpenDP's integer samplers; its ``epsilon`` input and ``privacy`` output are
  :data:`EPSILON` and :data:`PRIVACY`;
* :mod:`wire`, the one msgpack/JSON codec of client and server.

:mod:`fdrtd_server.sdk.host` lends the built-in microservices parts of the
server (bus, stored datasets, sources); it is not for plugins and may change.
"""

from __future__ import annotations

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
from fdrtd_server.sdk import curve, privacy, ring
from fdrtd_server.sdk.disclosure import finite_result, finite_rows, numeric, suppress
from fdrtd_server.sdk.ids import canonical_ids, id_bytes
from fdrtd_server.sdk.join import join_domain, join_ids
from fdrtd_server.sdk.namespace import Namespace
from fdrtd_server.sdk.parties import (
    agree,
    check_joint_cohort,
    declare,
    joint_count,
    session_for,
    vet_declared,
    vet_inputs,
)
from fdrtd_server.sdk.privacy import EPSILON, PRIVACY, private_release
from fdrtd_server.sdk.smpc import SmpcSession, points_from
from fdrtd_server.sdk.stages import Message, Stage, StagedPeers
from fdrtd_server.sdk.transfer import receive_bytes, send_bytes

__all__ = [
    "COLUMN",
    "DATA",
    "EPSILON",
    "PRIVACY",
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
    "Message",
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
    "Stage",
    "StagedPeers",
    "agree",
    "both",
    "canonical_ids",
    "check_joint_cohort",
    "curve",
    "declare",
    "distribution_version",
    "exit_with",
    "finite_result",
    "finite_rows",
    "id_bytes",
    "join_domain",
    "join_ids",
    "joint_count",
    "numeric",
    "points_from",
    "privacy",
    "private_release",
    "receive_bytes",
    "ring",
    "send_bytes",
    "session_for",
    "suppress",
    "vet_declared",
    "vet_inputs",
    "wire",
]
