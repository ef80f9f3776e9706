"""Exceptions the client raises, each carrying the server's message.

The tree::

    FdrtdClientError
    ├── TransportError              no HTTP answer at all
    │   ├── ConnectError            cannot reach the server
    │   └── RequestTimeout          the server did not answer in time
    ├── ServerError                 the server answered with an error status
    │   ├── BadRequest (400)
    │   ├── Unauthorized (401)
    │   ├── Forbidden (403)         refused by the server owner's policy
    │   ├── NotFound (404)
    │   ├── Conflict (409)
    │   ├── PayloadTooLarge (413)
    │   ├── ComputationFailed (422)
    │   ├── TooManyRequests (429)   more computations at once than the owner's policy allows
    │   ├── ServiceUnavailable (503)
    │   ├── PartyTimeout (504)
    │   └── InsufficientStorage (507) the server's store is full
    ├── ResultTimeout               a result was not ready within your timeout
    └── ReceiptError                a result's receipt failed verification

And one warning: :class:`InsecureTransportWarning` (a ``UserWarning``), for a
plain ``http://`` URL to another machine.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ComputationFailed",
    "Conflict",
    "ConnectError",
    "FdrtdClientError",
    "Forbidden",
    "InsecureTransportWarning",
    "InsufficientStorage",
    "NotFound",
    "PartyTimeout",
    "PayloadTooLarge",
    "ReceiptError",
    "RequestTimeout",
    "ResultTimeout",
    "ServerError",
    "ServiceUnavailable",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "error_from_problem",
]


class FdrtdClientError(Exception):
    """Base class of every error this client raises."""


class InsecureTransportWarning(UserWarning):
    """A server URL is plain ``http://`` to another machine: the token travels in clear.

    Filter it like any warning, e.g.
    ``warnings.simplefilter("error", InsecureTransportWarning)`` to refuse such
    URLs, or pass ``allow_insecure=True`` to the client for a trusted network.
    """


class TransportError(FdrtdClientError):
    """The request got no HTTP answer."""


class ConnectError(TransportError, ConnectionError):
    """The server cannot be reached at its URL."""


class RequestTimeout(TransportError, TimeoutError):
    """The server did not answer within the request timeout."""


class ResultTimeout(FdrtdClientError, TimeoutError):
    """A computation did not finish within the time you allowed."""


class ReceiptError(FdrtdClientError):
    """A result's receipt failed verification: do not trust the result as stated.

    Attributes:
        check: The check that failed: ``format``, ``parties``, ``key``,
            ``signature``, ``common``, ``cosignature``, ``output`` or
            ``federation`` (the federation file holding the keys is unreadable).
    """

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(f"receipt check '{check}' failed: {message}")


class ServerError(FdrtdClientError):
    """The server answered with an error; ``status`` and ``detail`` are its words."""

    status = 500

    def __init__(self, detail: str, status: int | None = None, server: str = "") -> None:
        self.detail = detail
        if status is not None:
            self.status = status
        self.server = server
        where = f" from {server}" if server else ""
        super().__init__(f"{self.status}{where}: {detail}")


class BadRequest(ServerError):
    """The request was malformed or a parameter broke a rule."""

    status = 400


class Unauthorized(ServerError):
    """The token is missing or not valid on that server."""

    status = 401


class Forbidden(ServerError):
    """The server owner's policy refuses (minimum cohort, disabled service...)."""

    status = 403


class NotFound(ServerError):
    """No such handle, route or microservice (or not one you may see)."""

    status = 404


class Conflict(ServerError):
    """The request clashes with the server's state."""

    status = 409


class PayloadTooLarge(ServerError):
    """The body is larger than the server accepts."""

    status = 413


class ComputationFailed(ServerError):
    """The computation ran but ended without a result."""

    status = 422


class TooManyRequests(ServerError):
    """You run as many computations at once as the owner's policy allows: wait for one."""

    status = 429


class ServiceUnavailable(ServerError):
    """The server or a microservice it needs is not running."""

    status = 503


class PartyTimeout(ServerError, TimeoutError):
    """A party of a multi-party computation did not answer in time."""

    status = 504


class InsufficientStorage(ServerError):
    """The server's storage is full: release datasets and results, or ask its owner."""

    status = 507


_BY_STATUS: dict[int, type[ServerError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        ComputationFailed,
        TooManyRequests,
        ServiceUnavailable,
        PartyTimeout,
        InsufficientStorage,
    )
}


def error_from_problem(status: int, detail: str, server: str = "") -> ServerError:
    """The exception for an error status and the server's message."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        return ServerError(detail, status, server)
    return cls(detail, status, server)
