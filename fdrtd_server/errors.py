"""Every error fdrtd raises on purpose, and the HTTP status it maps to.

The tree::

    FdrtdError
    ├── BadRequest (400)              malformed body, wrong types, bad parameter
    │   └── InsufficientData (400)    fewer rows than a computation needs
    ├── Unauthorized (401)            missing or wrong token
    ├── Forbidden (403)               the server owner's policy says no
    │   └── CohortTooSmall (403)      fewer records than the minimum cohort
    ├── NotFound (404)                unknown route, handle or microservice
    ├── Conflict (409)                replayed peer message, session clash
    ├── PayloadTooLarge (413)
    ├── TooManyRequests (429)         more computations at once than the owner's policy allows
    ├── UnsupportedMediaType (415)
    ├── PeerRejected (403)            a peer message failed verification
    ├── ComputationFailed (422)       a protocol ended without a result
    │   └── OutOfRange (422)          a value too large for a protocol's number encoding
    ├── SourceUnavailable (424)       a registered source cannot be read (file, database)
    ├── PartyTimeout (504)            a party did not answer in time
    ├── JobTimeout (504)              a computation outlasted its policy's whole-job timeout
    ├── ServiceUnavailable (503)      the bus or a microservice is down
    ├── PluginError (500)             a plugin asked the server for something it lacks
    └── InsufficientStorage (507)     a JetStream bucket of this server is full

Messages name the parameter, the rule and the fix; they never echo a value a
client sent, because values may be private data. Errors cross the bus as
``nats.micro`` service errors whose code is the HTTP status, so a worker on
another machine raises exactly what an in-process microservice would.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadRequest",
    "CohortTooSmall",
    "ComputationFailed",
    "Conflict",
    "FdrtdError",
    "Forbidden",
    "InsufficientData",
    "InsufficientStorage",
    "JobTimeout",
    "NotFound",
    "OutOfRange",
    "PartyTimeout",
    "PayloadTooLarge",
    "PeerRejected",
    "PluginError",
    "ServiceUnavailable",
    "SourceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_for_status",
]


class FdrtdError(Exception):
    """Base class: an error with an HTTP status and a message for a person."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    collective: bool = False
    """True when every party of a computation raises this error by itself (no abort needed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(FdrtdError):
    """The request is malformed or a parameter breaks a rule."""

    status = 400
    title = "Bad request"


class InsufficientData(BadRequest):
    """The dataset has too few rows for the computation asked for."""


class Unauthorized(FdrtdError):
    """No token, or a token the server does not know."""

    status = 401
    title = "Unauthorized"


class Forbidden(FdrtdError):
    """The token is valid but the server owner's policy refuses the request."""

    status = 403
    title = "Forbidden"


class CohortTooSmall(Forbidden):
    """A result would describe fewer records than the minimum cohort size."""

    def __init__(self, minimum: int) -> None:
        super().__init__(
            f"the result would cover fewer than the minimum cohort of {minimum} records "
            "that the servers' policies require; use a larger dataset"
        )
        self.minimum = minimum


class NotFound(FdrtdError):
    """No such route, handle or microservice (or not one this token may see)."""

    status = 404
    title = "Not found"


class Conflict(FdrtdError):
    """The request clashes with the server's state (a replay, a reused session)."""

    status = 409
    title = "Conflict"


class PayloadTooLarge(FdrtdError):
    """The body is larger than the configured limit."""

    status = 413
    title = "Payload too large"


class TooManyRequests(FdrtdError):
    """The caller runs as many computations at once as the owner's policy allows (429)."""

    status = 429
    title = "Too many requests"


class UnsupportedMediaType(FdrtdError):
    """The body's content type is not one the route accepts."""

    status = 415
    title = "Unsupported media type"


class PeerRejected(FdrtdError):
    """A peer message failed verification (non-member, forged, tampered, stale)."""

    status = 403
    title = "Peer message rejected"


class ComputationFailed(FdrtdError):
    """A computation ran but could not produce a result."""

    status = 422
    title = "Computation failed"


class OutOfRange(ComputationFailed):
    """A value of the data cannot be encoded for a secure protocol (422).

    Secure protocols compute on fixed-point integers in a ring of limited
    width; a value too large for it (or not finite) cannot take part. Every
    party reports the same status: a party that refuses tells the others,
    whose computation then fails with this party's reason.
    """

    title = "Value out of range"


class SourceUnavailable(FdrtdError):
    """A registered source cannot be read now: a missing file, an unreachable database (424).

    The computation depends on data the server reads in place
    (:mod:`fdrtd_server.sources`), and that read failed for a reason outside
    the request. The message names the kind of source and what failed, never
    a path, a connection string or a password.
    """

    status = 424
    title = "Source unavailable"


class PartyTimeout(FdrtdError, TimeoutError):
    """A party of a computation did not answer within the session timeout."""

    status = 504
    title = "Party timeout"


class JobTimeout(FdrtdError, TimeoutError):
    """A computation ran longer than the whole-job timeout of the owner's policy (504).

    The job is cancelled; in a multi-party computation this party tells the
    others, which fail with its reason.
    """

    status = 504
    title = "Job timeout"


class ServiceUnavailable(FdrtdError):
    """The bus or the microservice needed is not running."""

    status = 503
    title = "Service unavailable"


class InsufficientStorage(FdrtdError):
    """A bucket of this server is full, so nothing more can be stored (507)."""

    status = 507
    title = "Insufficient storage"


class PluginError(FdrtdError):
    """A plugin (a microservice's code) asked the server for something it does not have.

    A bug of the plugin, not of the request: the status stays 500, but the
    message names what the plugin got wrong, so that the client (and the
    plugin's author) can tell it apart from an unknown internal error.
    """

    status = 500
    title = "Plugin error"


_BY_STATUS: dict[int, type[FdrtdError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        TooManyRequests,
        ComputationFailed,
        SourceUnavailable,
        PartyTimeout,
        ServiceUnavailable,
        InsufficientStorage,
    )
}


def error_for_status(status: int, message: str) -> FdrtdError:
    """Rebuild an error that crossed the bus from its status and message."""
    cls = _BY_STATUS.get(status, FdrtdError)
    return cls(message)
