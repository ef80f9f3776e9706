"""The privacy budget route: what the caller has spent, and may still spend, of each dataset.

``GET /v1/budget`` (owners and analysts) lists every named dataset the caller
may see on this server with its differential privacy terms (whether the owner
requires it, the mechanism, the per-query epsilon and delta) and, where it
applies, what the caller has spent, her cap, and what she may still spend
(the smaller of her own remainder and the total's). Only the owner of a
dataset sees what all analysts together have spent, the total cap, and each
analyst's spend: an analyst learns nothing of the others' queries here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdrtd_server.http_common import caller, respond, state_of
from fdrtd_server.privacy import KvStore, Ledger
from fdrtd_server.routes.compute import current_policy

__all__ = ["budget"]


async def budget(request: Request) -> Response:
    """The caller's privacy budget of each named dataset she may see here."""
    principal = caller(request)
    state = state_of(request)
    policy = current_policy(state)
    ledger = Ledger(KvStore(state.bus.budgets))
    listed: list[dict[str, Any]] = []
    for entry, _ in state.custody.visible(principal.name, principal.role):
        terms = policy.of(entry.name).privacy
        item: dict[str, Any] = {
            "name": entry.name,
            "server": state.settings.name,
            "dp": terms.dp,
        }
        if terms.dp:
            found = await ledger.budget(entry.name, principal.name, terms)
            owner = entry.owner == principal.name
            item.update(
                mechanism=terms.mechanism,
                epsilon=terms.epsilon,
                min_epsilon=terms.min_epsilon,
                delta=terms.delta if terms.mechanism == "gaussian" else 0.0,
                **(found.to_dict() if owner else found.own()),
            )
            if owner:
                item["analysts"] = {k: v.shown() for k, v in sorted(found.analysts.items())}
        listed.append(item)
    state.audit.write(principal.name, "list", "budget")
    return respond(request, {"datasets": listed, "policy_version": policy.version})
