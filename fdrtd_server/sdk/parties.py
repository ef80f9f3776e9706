"""The parties of a multi-party function: its session, what they declare, what they agree on.

Every multi-party function opens its :func:`session_for` the request, sets up an
:class:`~fdrtd_server.sdk.smpc.SmpcSession` with what this party :func:`declare` s
in public (options, shapes, this server's minimum cohort, and where its inputs
come from), and refuses, on every party alike, what the parties do not
:func:`agree` on and a joint count below the strictest party's minimum cohort
(:func:`check_joint_cohort`). Once every party's declaration is known, the
session refuses exact results of a named dataset whose owner keeps
``analyst_inputs = false`` beside an upload of the caller's
(:mod:`fdrtd_server.provenance`); a protocol that exchanges its declarations
itself calls :func:`vet_inputs` on them.
A refusal that every party reaches from the same public values is marked
``collective``: no party has to tell the others to stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fdrtd_server import provenance
from fdrtd_server.errors import BadRequest, CohortTooSmall, ComputationFailed
from fdrtd_server.microservice import JobContext
from fdrtd_server.peers import PeerSession
from fdrtd_server.sdk import ring
from fdrtd_server.sdk.smpc import SmpcSession

__all__ = [
    "agree",
    "check_joint_cohort",
    "declare",
    "joint_count",
    "session_for",
    "vet_declared",
    "vet_inputs",
]


def session_for(ctx: JobContext) -> PeerSession:
    """The peer session a multi-party function runs in, from the request's ``session``.

    A context that offers its own ``peer_session()`` (the testing kit's do: an
    in-memory federation, :mod:`fdrtd_server.sdk.testing`) is asked for it;
    any other gets the real :class:`~fdrtd_server.peers.PeerSession` over the
    peer gateways. So a protocol's tests run its real code, with no patching.

    Raises:
        BadRequest: If the request has no ``session``.
    """
    own = getattr(ctx, "peer_session", None)
    if callable(own):
        session: PeerSession = own()
    else:
        spec = ctx.session
        if not spec:
            raise BadRequest(
                "this is a multi-party protocol: give a 'session' with an 'id' and the 'parties'"
            )
        session = PeerSession(
            ctx.bus, spec["id"], spec["parties"], ctx.env.server, ctx.env.session_timeout
        )
    # an SmpcSession set up without declare() still declares where the inputs come from
    found = getattr(ctx, "provenance", None)  # a stand-in context of a test may have none
    if isinstance(found, provenance.Provenance):
        provenance.bind(session, found)
    return session


def agree(smpc: SmpcSession, key: str) -> Any:
    """The value of public ``key`` that every party declared; refuse disagreement."""
    values = {party: public.get(key) for party, public in smpc.public.items()}
    distinct = {repr(v) for v in values.values()}
    if len(distinct) != 1:
        error = ComputationFailed(f"the parties disagree on '{key}'; every party must use the same")
        error.collective = True  # every party sees the same declarations: no abort needed
        raise error
    return values[smpc.peers.me]


def declare(ctx: JobContext, **public: Any) -> dict[str, Any]:
    """Public metadata for ``SmpcSession.setup``, with this server's minimum cohort.

    It also states where this party's inputs come from (key ``provenance``:
    whether it loaded an upload of the caller's, and which named datasets it
    read exactly whose owner keeps ``analyst_inputs = false``), so load every
    dataset first: one loaded after it is a :class:`PluginError`.
    """
    return {
        **public,
        "min_cohort": ctx.env.min_cohort,
        provenance.KEY: ctx.provenance.declared(),
    }


def vet_inputs(public: Mapping[str, Any]) -> None:
    """Refuse, on every party alike, an owner's exact data beside inputs of the caller's.

    ``SmpcSession`` calls it once every party's public metadata is known; a
    protocol that exchanges its :func:`declare` d values itself (PSI) calls it
    on them, by party, before anything else is sent.

    Raises:
        Forbidden: If a party read a named dataset exactly whose owner's policy
            has ``analyst_inputs = false`` and any party loaded an upload of
            the caller's; marked ``collective``.
    """
    provenance.vet(public)


def check_joint_cohort(ctx: JobContext, smpc: SmpcSession, total: float) -> None:
    """Refuse a result over fewer records than the strictest party's minimum cohort.

    Every party declared its policy's ``min_cohort`` (see :func:`declare`) and
    every party sees the same total, so all of them refuse together, at the
    same point of the protocol.

    Raises:
        CohortTooSmall: If ``total`` is below the largest declared minimum.
    """
    declared = [p.get("min_cohort") for p in smpc.public.values()]
    minimums = [m for m in declared if isinstance(m, int) and not isinstance(m, bool)]
    strictest = max([ctx.env.min_cohort, *minimums])
    if round(total) < strictest:
        error = CohortTooSmall(strictest)
        error.collective = True  # every party sees the same total: no abort needed
        raise error


def vet_declared(ctx: JobContext, smpc: SmpcSession, total: int, *keys: str) -> None:
    """Refuse, on every party alike, unless all declared the same ``keys`` and the cohort holds.

    The ``vet`` of :meth:`SmpcSession.count_and_sum` for most functions.
    """
    for key in keys:
        agree(smpc, key)
    check_joint_cohort(ctx, smpc, total)


async def joint_count(ctx: JobContext, smpc: SmpcSession, rows: int) -> int:
    """Securely sum the parties' record counts and check the joint cohort."""
    encoded = ring.encode_int(np.array([rows]), parties=smpc.parties)
    total = int(ring.decode_int(await smpc.sum_ring(encoded))[0])
    check_joint_cohort(ctx, smpc, total)
    return total
