"""The compute route: check a request, start the computation, answer its handle or its end.

The body names a microservice, one of its functions and the inputs; a
multi-party computation also names its session (an id drawn at random and
the parties). The controller checks the shape of the request, sends it on to
the microservice with the datasets the caller may use, and answers the
result handle, or the result itself if the job ends within ``?wait=``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdrtd_server.bus import JobRecord, new_handle
from fdrtd_server.config import NAME_RULE as SERVER_NAME
from fdrtd_server.errors import BadRequest, NotFound, ServiceUnavailable
from fdrtd_server.http_common import (
    BUS_TIMEOUT,
    State,
    audit_refusals,
    call_service,
    caller,
    read_body,
    refusals_end,
    respond,
    state_of,
)
from fdrtd_server.inputs import sent_name
from fdrtd_server.policy import Policy, PolicyError
from fdrtd_server.routes.results import audit_result, view, wait_and_value

__all__ = ["COMPUTE_KEYS", "NAME", "SESSION_ID", "SESSION_KEYS", "compute"]

NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""A microservice's or a function's name."""
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")
"""A session id: at least 22 characters (128 bits if drawn at random, e.g.
``secrets.token_urlsafe(16)``; ``secrets.token_hex(16)`` gives 32), so that no
client can guess, pre-claim or collide with another's id."""
COMPUTE_KEYS = ("microservice", "function", "inputs", "session")
"""The keys of a ``POST /v1/compute`` body."""
SESSION_KEYS = ("id", "parties")
"""The keys of its ``session``."""
_INT64 = (-(2**63), 2**64 - 1)
"""The integers msgpack (and so the bus) carries: int64 and uint64."""


def _check_session(session: Any) -> dict[str, Any] | None:
    if session is None:
        return None
    if not isinstance(session, dict):
        raise BadRequest("'session' must be a map with 'id' and 'parties'")
    _refuse_unknown_keys(session, SESSION_KEYS, "'session'")
    sid, parties = session.get("id"), session.get("parties")
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise BadRequest(
            "'session.id' must be 22 to 64 letters, digits, '-' or '_', drawn at random "
            "(at least 128 bits, e.g. Python's secrets.token_urlsafe(16)) so that nobody "
            "can guess it"
        )
    if (
        not isinstance(parties, list)
        or not 2 <= len(parties) <= 64
        or not all(isinstance(p, str) and SERVER_NAME.fullmatch(p) for p in parties)
        or len(set(parties)) != len(parties)
    ):
        raise BadRequest("'session.parties' must list 2 to 64 distinct server names")
    return {"id": sid, "parties": parties}


def _refuse_unknown_keys(body: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``body`` that is not one of ``known`` (named if it looks like a name).

    Raises:
        BadRequest: Naming ``where``, the key and the accepted keys.
    """
    unknown = [key for key in body if key not in known]
    if unknown:
        named = sent_name(unknown[0], "a key")
        raise BadRequest(
            f"{where} has {named} that is not one of its keys; its keys are "
            f"{', '.join(known)}: check the spelling, or move the value under 'inputs'"
        )


def _wide_ints_as_floats(value: Any) -> Any:
    """``value`` with integers beyond 64 bits as floats, which the bus can carry.

    JSON has one kind of number: ``1e30`` and ``1000000000000000000000000000000``
    are the same value, and the second is sent on as the first. A declared
    ``integer`` input refuses it then by its range, with a message naming it.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        try:
            return float(value)
        except OverflowError:
            return value  # beyond the float range too: refused by bus_request
    if isinstance(value, dict):
        return {key: _wide_ints_as_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wide_ints_as_floats(item) for item in value]
    return value


def _strings(value: Any, depth: int = 0) -> set[str]:
    """The short strings in ``value`` (the dataset names a request may mention)."""
    if isinstance(value, str):
        return {value} if len(value) <= 63 else set()
    if depth > 8:
        return set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        found: set[str] = set()
        for item in value[:4096]:
            found |= _strings(item, depth + 1)
        return found
    return set()


def current_policy(state: State) -> Policy:
    """The owner's policy in force now (``DIR/policy.toml``, read again when it changes).

    Raises:
        ServiceUnavailable: If the file was changed into one that breaks a rule:
            nothing is computed until the owner mends it (``fdrtd-server policy check``).
    """
    try:
        return state.policy.current()
    except PolicyError:
        # logged and audited once per change of the file (PolicyStore)
        raise ServiceUnavailable(
            "this server's policy file is invalid, so nothing is computed until its owner "
            "mends it (fdrtd-server policy check names the line)"
        ) from None


def _alive(state: State) -> Callable[[str], Awaitable[bool]]:
    """Whether the job of a result handle still runs, as its record says."""

    async def alive(handle: str) -> bool:
        found = await state.bus.get_job(handle)
        return found is not None and not found[0].finished

    return alive


async def compute(request: Request) -> Response:
    """Start a computation; answer its result handle (202), or its end (200).

    ``?wait=s`` holds the request up to ``s`` seconds for the job to end: a
    job that finished (done or failed) by then is answered 200 with the view
    ``GET /v1/results/{handle}`` gives (its value left out with
    ``&value=false``), so that a fast computation costs one request.
    Otherwise, and with the default ``wait=0``, the answer is 202 ``{result,
    status}``. Both parameters are checked before anything starts.

    The microservice itself holds its answer (the bus request's ``wait``) and
    sends the final record along, having written it once: no "running" record,
    no watch on the jobs bucket and no second read for a fast job.
    """
    principal = caller(request)
    state = state_of(request)
    wait, with_value = wait_and_value(request)
    body = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be a map with 'microservice', 'function' and 'inputs'")
    _refuse_unknown_keys(body, COMPUTE_KEYS, "the body")
    names: list[str] = []
    for key in ("microservice", "function"):
        value = body.get(key)
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise BadRequest(f"'{key}' must be a name of lowercase letters, digits and '_'")
        names.append(value)
    microservice, function = names
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be a map")
    inputs = _wide_ints_as_floats(inputs)
    allowed = state.settings.microservices
    if allowed and microservice not in allowed:
        raise NotFound(f"no microservice '{microservice}' is enabled on this server")
    session = _check_session(body.get("session"))
    handle = new_handle("result")
    audit_refusals(request, "compute", f"{microservice}.{function}")
    datasets = state.custody.usable(
        principal.name, principal.role, microservice, function, _strings(inputs)
    )
    policy = current_policy(state)
    policy.check_functions(datasets, microservice, function)
    running = state.policy.running  # the owner's max_concurrent, counted until the job ends
    await running.admit(handle, principal.name, policy.limits(datasets), _alive(state))
    answer = None
    try:
        answer = await call_service(
            request,
            microservice,
            function,
            inputs,
            principal=principal,
            result=handle,
            session=session,
            datasets=datasets,
            policy=policy.message(datasets),
            bus_timeout=BUS_TIMEOUT + wait,
            **({"wait": wait, "value": with_value} if wait > 0 else {}),
        )
    finally:
        running.started(handle, answer)
    refusals_end(request)
    state.audit.write(
        principal.name, "compute", handle, microservice=microservice, function=function
    )
    if not isinstance(answer, dict) or answer.get("result") != handle:
        raise BadRequest(f"'{microservice}.{function}' is not a computation; it cannot be started")
    final = answer.get("record")
    if isinstance(final, dict):
        record = JobRecord.from_dict(final)
        if record.finished:
            answer_view = await view(state, handle, record, with_value)
            audit_result(state, principal.name, handle, answer_view, "compute")
            return respond(request, answer_view)
    return respond(request, {"result": handle, "status": answer.get("status", "queued")}, 202)
