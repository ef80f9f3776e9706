"""The custody routes: the catalogue, publishing, grants and sources.

============================================  ============  ===============================
route                                         roles         what
============================================  ============  ===============================
``GET /v1/catalogue``                         all           the datasets the caller may use
``POST /v1/datasets``                         owner         publish an upload under a name
``DELETE /v1/datasets/{name}``                owner, admin  withdraw it (and its grants)
``GET /v1/grants``                            owner, admin  the grants of one's datasets
``POST /v1/grants``                           owner, admin  grant a token name their use
``DELETE /v1/grants/{name}/{grantee}``        owner, admin  revoke; the next request sees it
``GET /v1/sources``                           admin         sources (no connection strings)
``POST /v1/sources``                          admin         register a file or a database
``DELETE /v1/sources/{name}``                 admin         remove a source (and its grants)
============================================  ============  ===============================

The catalogue shows a dataset's schema, a coarse row count and its version,
never values. Of a dataset whose owner requires differential privacy it shows
no row count but to its owner (:func:`shown_rows`): even a coarse count is a
deterministic function of the number of records, released without noise (a
record more moves 14 to 15, shown 10 to 20).

A dataset the caller may not see is answered like one that does not exist
(404), on every route.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdrtd_server.custody import DATASET_NAME, CustodyStore, DatasetEntry, Grant
from fdrtd_server.errors import BadRequest, Conflict, NotFound
from fdrtd_server.http_common import (
    Principal,
    audit_refusals,
    call_service,
    caller,
    read_body,
    respond,
    state_of,
)
from fdrtd_server.inputs import DATA_HANDLE
from fdrtd_server.policy import Policy, PolicyError

__all__ = [
    "add_grant",
    "add_source",
    "catalogue",
    "coarse_rows",
    "list_grants",
    "list_sources",
    "publish",
    "remove_source",
    "revoke_grant",
    "shown_rows",
    "withdraw",
]

_PUBLISH_KEYS = ("name", "handle", "description")
_GRANT_KEYS = ("dataset", "grantee", "functions", "not_before", "not_after")
_SOURCE_KEYS = ("name", "owner", "description", "source")


def _audited_as(request: Request, action: str) -> None:
    """Audit the route's refusals as ``action`` on the name in the path ("-" if none)."""
    target = request.path_params.get("name", "")
    named = target if DATASET_NAME.fullmatch(target) else "(not a name)"
    audit_refusals(request, action, named if target else "-")


def coarse_rows(rows: Any, min_cohort: int) -> int | str | None:
    """A row count as the catalogue shows it.

    "under k" below the minimum cohort, else rounded to two significant
    digits, and to tens at least.
    """
    if not isinstance(rows, int) or isinstance(rows, bool):
        return None
    if rows < min_cohort:
        return f"under {min_cohort}"
    step = max(10, 10 ** (len(str(rows)) - 2))
    rounded: int = max(step, round(rows / step) * step)
    return rounded


PRIVATE_ROWS = (
    "private: the owner requires differential privacy for this dataset, so its row count "
    "is released only as a noisy count (smpc.count, map.aggregate)"
)
"""The note beside ``rows: null`` of a dataset under differential privacy."""


def shown_rows(rows: Any, min_cohort: int, private: bool) -> dict[str, Any]:
    """The ``rows`` of a catalogue entry (and a note if it is private).

    Args:
        rows: The number of records, as the catalogue microservice found it.
        min_cohort: The server's minimum cohort (:func:`coarse_rows`).
        private: Whether the count must stay hidden: the dataset is under
            differential privacy (or the policy cannot be read) and the
            caller is not its owner.
    """
    if private:
        return {"rows": None, "rows_note": PRIVATE_ROWS}
    return {"rows": coarse_rows(rows, min_cohort)}


def _body_map(body: Any, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a map with {', '.join(keys)}")
    unknown = [key for key in body if key not in keys]
    if unknown:
        raise BadRequest(f"{what} takes the keys {', '.join(keys)}; check the spelling")
    return body


def _mine(custody: CustodyStore, name: str, principal: Principal) -> DatasetEntry:
    """The dataset ``name`` if the caller may manage it (its owner, or an admin)."""
    entry = custody.get(name)
    if entry is None or (principal.role != "admin" and entry.owner != principal.name):
        raise NotFound(f"no dataset named {_named(name)} among yours on this server")
    return entry


def _named(name: Any) -> str:
    """A name from the request, quoted if it is one, else described (never echoed long)."""
    return f"'{name}'" if isinstance(name, str) and DATASET_NAME.fullmatch(name) else "like that"


async def catalogue(request: Request) -> Response:
    """The datasets the caller may use here, never their values.

    Each with its name, description, owner, schema, coarse row count (none
    under differential privacy, but to its owner: :func:`shown_rows`), the
    functions the caller may use it for, its version, and the owner's policy
    as it concerns her (:meth:`fdrtd_server.policy.DatasetPolicy.public`).
    """
    principal = caller(request)
    state = state_of(request)
    visible = state.custody.visible(principal.name, principal.role)
    described: dict[str, Any] = {}
    if visible:
        try:
            answer = await call_service(
                request,
                "catalogue",
                "describe",
                {},
                principal=principal,
                datasets={entry.name: entry.message() for entry, _ in visible},
            )
        except NotFound:  # the policy runs no catalogue microservice: names only
            answer = {}
        described = answer.get("datasets", {}) if isinstance(answer, dict) else {}
    k = state.settings.min_cohort
    try:
        policy: Policy | None = state.policy.current()
    except PolicyError:
        policy = None  # computations answer 503 until the owner mends it; listing goes on
    listed = []
    for entry, grants in visible:
        facts = described.get(entry.name) or {}
        mine = entry.owner == principal.name or principal.role == "admin"
        if mine or not grants or any(not g.functions for g in grants):
            functions = ["*"]
        else:
            functions = sorted({f for g in grants for f in g.functions})
        item: dict[str, Any] = {
            "name": entry.name,
            "server": state.settings.name,
            "description": entry.description,
            "owner": entry.owner,
            "kind": entry.kind,
            "columns": facts.get("columns"),
            # under DP (or an unreadable policy) a row count only for its owner
            **shown_rows(
                facts.get("rows"),
                k,
                entry.owner != principal.name
                and (policy is None or policy.of(entry.name).privacy.dp),
            ),
            "functions": functions,
            "version": facts.get("version"),
            # the owner's rules for it (functions, cohort, cells, dp, bounds), never values
            "policy": policy.of(entry.name).public(k) if policy else None,
            "policy_version": policy.version if policy else None,
        }
        if "error" in facts:
            item["error"] = facts["error"]
        listed.append(item)
    state.audit.write(principal.name, "list", "catalogue", datasets=len(listed))
    return respond(request, {"server": state.settings.name, "datasets": listed})


async def publish(request: Request) -> Response:
    """Publish one of the caller's uploads under a name (owners only)."""
    principal = caller(request)
    _audited_as(request, "publish")
    state = state_of(request)
    body = _body_map(await read_body(request), _PUBLISH_KEYS, "publishing")
    handle = body.get("handle")
    if not isinstance(handle, str) or not DATA_HANDLE.fullmatch(handle):
        raise BadRequest("'handle' must be the data handle of one of your uploads")
    # the data microservice checks that the handle is the caller's (404 otherwise)
    await call_service(request, "data", "describe", {"handle": handle}, principal=principal)
    try:
        entry = state.custody.publish(
            body.get("name"), principal.name, str(handle), body.get("description", "")
        )
    except ValueError as error:
        raise BadRequest(str(error)) from None
    except FileExistsError as error:
        raise Conflict(str(error)) from None
    state.audit.write(principal.name, "publish", entry.name, handle=str(handle))
    return respond(request, {"name": entry.name, "kind": entry.kind, "owner": entry.owner}, 201)


async def withdraw(request: Request) -> Response:
    """Withdraw a dataset from the catalogue (its owner, or an admin); its grants go with it."""
    principal = caller(request)
    _audited_as(request, "withdraw")
    state = state_of(request)
    name = request.path_params["name"]
    entry = _mine(state.custody, name, principal)
    try:
        state.custody.remove(entry.name)
    except PermissionError as error:
        raise Conflict(str(error)) from None
    except KeyError:
        raise NotFound(f"no dataset named {_named(name)} among yours on this server") from None
    state.audit.write(principal.name, "withdraw", entry.name, kind=entry.kind)
    return respond(request, {"name": entry.name, "withdrawn": True})


async def list_grants(request: Request) -> Response:
    """The grants of the caller's datasets (all of them for an admin)."""
    principal = caller(request)
    state = state_of(request)
    datasets = state.custody.datasets()
    grants = [
        g.to_dict()
        for g in state.custody.grants()
        if principal.role == "admin"
        or (g.dataset in datasets and datasets[g.dataset].owner == principal.name)
    ]
    state.audit.write(principal.name, "list", "grants")
    return respond(request, {"grants": grants})


async def add_grant(request: Request) -> Response:
    """Grant a token name the use of one of the caller's datasets."""
    principal = caller(request)
    _audited_as(request, "grant")
    state = state_of(request)
    body = _body_map(await read_body(request), _GRANT_KEYS, "a grant")
    name = body.get("dataset")
    if not isinstance(name, str):
        raise BadRequest("'dataset' must be the name of one of your datasets")
    entry = _mine(state.custody, name, principal)
    grantee = body.get("grantee")
    if isinstance(grantee, str) and state.tokens.role_of(grantee) not in ("analyst", "owner"):
        raise BadRequest(
            "'grantee' must be the token name of an analyst or owner of this server: create "
            "the token first (fdrtd-server token add), so that a grant never waits for "
            "whoever is given that name later"
        )
    try:
        grant = Grant.make(
            entry.name,
            body.get("grantee"),
            body.get("functions", ()),
            body.get("not_before"),
            body.get("not_after"),
            principal.name,
        )
        grant = state.custody.grant(grant)  # as stored: with the dataset's owner
    except ValueError as error:
        raise BadRequest(str(error)) from None
    except KeyError:
        raise NotFound(f"no dataset named {_named(name)} among yours on this server") from None
    state.audit.write(
        principal.name,
        "grant",
        entry.name,
        grantee=grant.grantee,
        functions=",".join(grant.functions) or "*",
        not_before=grant.not_before or "",
        not_after=grant.not_after or "",
    )
    return respond(request, grant.to_dict(), 201)


async def revoke_grant(request: Request) -> Response:
    """Revoke a grant; the grantee's next request no longer finds the dataset."""
    principal = caller(request)
    _audited_as(request, "revoke")
    state = state_of(request)
    name, grantee = request.path_params["name"], request.path_params["grantee"]
    entry = _mine(state.custody, name, principal)
    try:
        state.custody.revoke(entry.name, grantee)
    except KeyError:
        raise NotFound(f"no grant of '{entry.name}' to that name") from None
    state.audit.write(principal.name, "revoke", entry.name, grantee=grantee[:64])
    return respond(request, {"dataset": entry.name, "grantee": grantee, "revoked": True})


def _source_view(entry: DatasetEntry) -> dict[str, Any]:
    """A source as the admin sees it: everything but connection strings."""
    source = {k: v for k, v in entry.source.items() if k != "dsn" and v not in ("", 0, [], ())}
    if entry.source.get("dsn"):
        source["dsn"] = "(set)"
    return {
        "name": entry.name,
        "owner": entry.owner,
        "description": entry.description,
        "kind": entry.kind,
        "source": source,
        "configured": entry.configured,
    }


async def list_sources(request: Request) -> Response:
    """The registered sources (admins only); connection strings are never shown."""
    principal = caller(request)
    state = state_of(request)
    sources = [_source_view(e) for e in state.custody.datasets().values() if e.kind != "upload"]
    state.audit.write(principal.name, "list", "sources")
    return respond(request, {"sources": sorted(sources, key=lambda s: str(s["name"]))})


async def add_source(request: Request) -> Response:
    """Register a file, a directory of files or a database table/query, read in place."""
    principal = caller(request)
    _audited_as(request, "source-add")
    state = state_of(request)
    body = _body_map(await read_body(request), _SOURCE_KEYS, "a source")
    source = body.get("source")
    owner = body.get("owner")
    if isinstance(owner, str) and state.tokens.role_of(owner) != "owner":
        raise BadRequest(
            "'owner' must be the token name of an owner of this server (fdrtd-server token "
            "add DIR NAME --role owner)"
        )
    if not isinstance(source, dict):
        raise BadRequest("'source' must be a map of the source's settings (kind, path, ...)")
    try:
        entry = state.custody.add_source(
            body.get("name"), body.get("owner"), source, body.get("description", "")
        )
    except ValueError as error:
        raise BadRequest(str(error)) from None
    except FileExistsError as error:
        raise Conflict(str(error)) from None
    state.audit.write(principal.name, "source-add", entry.name, kind=entry.kind, owner=entry.owner)
    return respond(request, _source_view(entry), 201)


async def remove_source(request: Request) -> Response:
    """Remove a registered source and its grants (admins only)."""
    principal = caller(request)
    _audited_as(request, "source-remove")
    state = state_of(request)
    name = request.path_params["name"]
    entry = state.custody.get(name)
    if entry is None or entry.kind == "upload":
        raise NotFound(f"no source named {_named(name)} on this server")
    try:
        state.custody.remove(entry.name)
    except PermissionError as error:
        raise Conflict(str(error)) from None
    except KeyError:
        raise NotFound(f"no source named {_named(name)} on this server") from None
    state.audit.write(principal.name, "source-remove", entry.name)
    return respond(request, {"name": entry.name, "removed": True})
