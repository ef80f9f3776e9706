"""fdrtd_client: a thin client for fdrtd servers.

>>> import fdrtd_client
>>> server = fdrtd_client.connect("http://127.0.0.1:8000", token="...")
>>> data = server.upload([1.0, 2.0, 3.0])           # a data handle; never downloadable
>>> job = server.compute("map", "aggregate", data=data)
>>> job.result(timeout=30)                           # waits, showing progress on a terminal

For several servers at once, see :class:`Federation`.
"""

from __future__ import annotations

from fdrtd_client._client import Client as Client
from fdrtd_client._client import Handle as Handle
from fdrtd_client._client import Job as Job
from fdrtd_client._client import connect as connect
from fdrtd_client._federation import FederatedDataset as FederatedDataset
from fdrtd_client._federation import FederatedJob as FederatedJob
from fdrtd_client._federation import Federation as Federation
from fdrtd_client._federation import combine_aggregates as combine_aggregates
from fdrtd_client.errors import BadRequest as BadRequest
from fdrtd_client.errors import ComputationFailed as ComputationFailed
from fdrtd_client.errors import Conflict as Conflict
from fdrtd_client.errors import ConnectError as ConnectError
from fdrtd_client.errors import FdrtdClientError as FdrtdClientError
from fdrtd_client.errors import Forbidden as Forbidden
from fdrtd_client.errors import InsecureTransportWarning as InsecureTransportWarning
from fdrtd_client.errors import InsufficientStorage as InsufficientStorage
from fdrtd_client.errors import NotFound as NotFound
from fdrtd_client.errors import PartyTimeout as PartyTimeout
from fdrtd_client.errors import PayloadTooLarge as PayloadTooLarge
from fdrtd_client.errors import ReceiptError as ReceiptError
from fdrtd_client.errors import RequestTimeout as RequestTimeout
from fdrtd_client.errors import ResultTimeout as ResultTimeout
from fdrtd_client.errors import ServerError as ServerError
from fdrtd_client.errors import ServiceUnavailable as ServiceUnavailable
from fdrtd_client.errors import TooManyRequests as TooManyRequests
from fdrtd_client.errors import TransportError as TransportError
from fdrtd_client.errors import Unauthorized as Unauthorized

__all__ = [
    "BadRequest",
    "Client",
    "ComputationFailed",
    "Conflict",
    "ConnectError",
    "FdrtdClientError",
    "FederatedDataset",
    "FederatedJob",
    "Federation",
    "Forbidden",
    "Handle",
    "InsecureTransportWarning",
    "InsufficientStorage",
    "Job",
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
    "combine_aggregates",
    "connect",
]
