"""The thin client for one server: upload, compute, wait, release."""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import requests
import urllib3

from fdrtd_client import _tables, receipts, wire
from fdrtd_client.errors import (
    ConnectError,
    FdrtdClientError,
    InsecureTransportWarning,
    ReceiptError,
    RequestTimeout,
    ResultTimeout,
    error_from_problem,
)

__all__ = ["Client", "Handle", "Job", "connect"]

UPLOAD_CHUNK = 1024 * 1024
MAX_POLL = 20.0
MAX_START_WAIT = 60.0
"""The longest ``wait`` a server accepts on ``POST /v1/compute`` (its ``MAX_WAIT``)."""
FINISHED = ("done", "failed")


class Handle(str):
    """An opaque handle the server returned (a data or a result handle).

    It is a plain string, so it can be stored, printed and sent to a
    colleague; on its own it grants nothing without the owner's token.
    """

    __slots__ = ()

    @property
    def kind(self) -> str:
        """``"data"`` or ``"result"``."""
        return "data" if self.startswith("d-") else "result"


def _array_chunks(array: np.ndarray[Any, Any]) -> Iterator[bytes]:
    view = memoryview(
        np.ascontiguousarray(array).tobytes()
        if array.ndim == 0
        else np.ascontiguousarray(array).data
    ).cast("B")
    for start in range(0, len(view), UPLOAD_CHUNK):
        yield bytes(view[start : start + UPLOAD_CHUNK])


def _file_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(UPLOAD_CHUNK):
        yield chunk


_WARNED: set[str] = set()
"""The insecure server addresses warned about in this process (each is warned about once)."""
_WARNED_LOCK = threading.Lock()


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (traffic to it never crosses a network)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_if_insecure(base: str) -> None:
    """Warn once per server if ``base`` is plain HTTP to another machine."""
    parts = urlsplit(base)
    if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
        return
    with _WARNED_LOCK:
        if parts.netloc in _WARNED:
            return
        _WARNED.add(parts.netloc)
    warnings.warn(
        f"{base} is plain http:// to another machine: your token and every answer travel "
        "unencrypted and can be read or changed on the way. Use https://, or pass "
        "allow_insecure=True if this network is trusted (e.g. a private container network).",
        InsecureTransportWarning,
        stacklevel=3,
    )


def _problem_detail(response: requests.Response) -> str:
    """The ``detail`` of an error answer, or its reason if the body is no problem document."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"]:
        return str(body["detail"])
    return response.reason or f"HTTP error {response.status_code}"


class Client:
    """A connection to one fdrtd server.

    Args:
        url: The server's base URL, e.g. ``http://127.0.0.1:8000``.
        token: Your token on that server.
        timeout: Seconds to wait for any one HTTP answer.
        verify: TLS verification (``True``, or a CA bundle path, such as the
            federation's CA); never turned off by default. ``True`` uses
            ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` if set. Proxy variables are
            honoured too; both are read when the client is made.
        cert: A TLS client certificate, for servers that require one (mutual
            TLS): the path of a PEM file holding certificate and key, or a
            ``(certificate, key)`` pair of paths. The key must be unencrypted.
        start_wait: Seconds (0 to 60) the server may hold a request that starts a
            computation, so that a fast computation's result comes back with it
            and :meth:`Job.result` needs no further request; a computation that
            takes longer is answered when this time is up, and then polled. ``0``
            returns at once, as soon as the computation has started.
        allow_insecure: Say that plain ``http://`` to another machine is meant
            (a trusted private network). Without it such a URL gives an
            :class:`InsecureTransportWarning`, once per server and process, since
            the token would travel unencrypted. ``http://`` to this machine
            (``localhost``, ``127.0.0.1``, ``::1``) never warns.
        federation: A federation file (``federation.toml``, as servers keep it)
            holding the public keys that result receipts are checked against.
            Without it, the key the server shows at ``GET /v1/identity`` is
            fetched once and kept for this client (trust on first use).

    Warns:
        InsecureTransportWarning: For ``http://`` to another machine, unless
            ``allow_insecure`` is set.

    Raises:
        FdrtdClientError: If ``start_wait`` is out of range.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        start_wait: float = 0.25,
        allow_insecure: bool = False,
        federation: str | Path | None = None,
    ) -> None:
        if not 0 <= start_wait <= MAX_START_WAIT:
            raise FdrtdClientError(f"'start_wait' must be between 0 and {MAX_START_WAIT:g} seconds")
        self.url = url.rstrip("/")
        checked = requests.PreparedRequest()
        try:
            checked.prepare_url(self.url, None)  # requests' checks and IDNA, once
        except requests.RequestException as error:
            raise FdrtdClientError(f"{url!r} is not a server URL: {error}") from None
        self._base = str(checked.url).rstrip("/")
        if not self._base.startswith(("http://", "https://")):
            raise FdrtdClientError(f"{url!r} is not a server URL: it must start with http(s)://")
        if not allow_insecure:
            _warn_if_insecure(self._base)
        self.timeout = timeout
        self.start_wait = start_wait
        self.federation = None if federation is None else Path(federation)
        self._receipt_keys: dict[str, bytes] | None = None
        self._session = requests.Session()
        # The environment (proxy variables, REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE)
        # is read once here instead of on every request, which costs requests
        # ~0.4 ms of CPU each time; a ~/.netrc is not used, as its basic auth
        # would replace the bearer token.
        self._session.trust_env = False
        self._session.proxies.update(requests.utils.get_environ_proxies(self.url))
        if verify is True:
            verify = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
            )
        self._session.verify = verify
        self._session.cert = cert
        self._session.headers.update({"authorization": f"Bearer {token}", "accept": wire.MSGPACK})

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        """Close the HTTP connections (the client opens new ones if used again)."""
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout: float | None = None,
        params: Mapping[str, str] | None = None,
        data: bytes | Iterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request and decode the answer.

        Args:
            method: The HTTP method.
            path: The path below the server's URL, e.g. ``/v1/data``.
            body: A value to send as msgpack (instead of ``data``).
            timeout: Seconds to wait for the answer; defaults to the client's.
            params: The query string.
            data: The raw body: bytes, or an iterator of chunks to stream.
            headers: Extra headers (the token and ``accept`` are always sent).

        Raises:
            ServerError: The subclass matching the server's error status.
            TransportError: If the server cannot be reached or does not answer.
        """
        sent: dict[str, str | bytes] = {**self._session.headers, **(headers or {})}
        if body is not None:
            data = wire.packb(body)
            sent["content-type"] = wire.MSGPACK
        # What Session.request does, less its merging of per-call settings with
        # the session's (this client never passes any) and less parsing our own
        # URL again (checked once, in __init__): about a fifth less CPU a call.
        prepared = requests.PreparedRequest()
        prepared.prepare_method(method)
        # quoted as requests would (a handle given by the caller may hold anything)
        target = requests.utils.requote_uri(path)
        prepared.url = self._base + target + ("?" + urlencode(params) if params else "")
        prepared.prepare_headers(sent)
        if self._session.cookies:  # set by a proxy or load balancer in front, if any
            prepared.prepare_cookies(self._session.cookies)
        prepared.prepare_body(data, None)
        try:
            response = self._session.send(prepared, timeout=timeout or self.timeout)
        except requests.exceptions.SSLError as error:
            raise ConnectError(
                f"the TLS handshake with the fdrtd server at {self.url} failed: pass "
                "verify='CA bundle' if its certificate is signed by a private CA, and "
                "cert=(certificate, key) if it requires a client certificate"
            ) from error
        except requests.ConnectionError as error:
            hint = ""
            if self._base.startswith("https://") and isinstance(
                error.args[0] if error.args else None, urllib3.exceptions.ProtocolError
            ):
                # TLS 1.3: a server refuses a client certificate after the client's side
                # of the handshake, and the refusal reaches requests as a close
                hint = (
                    ": it closed the connection without answering; if it requires a TLS "
                    "client certificate, pass cert=(certificate, key)"
                )
            raise ConnectError(f"cannot reach the fdrtd server at {self.url}{hint}") from error
        except requests.Timeout as error:
            raise RequestTimeout(
                f"{self.url} did not answer within {timeout or self.timeout:g} s"
            ) from error
        if response.status_code >= 400:
            raise error_from_problem(response.status_code, _problem_detail(response), self.url)
        if response.headers.get("content-type", "").startswith(wire.MSGPACK):
            return wire.unpackb(response.content)
        return wire.from_jsonable(response.json())

    # -- data ------------------------------------------------------------------

    def upload(self, data: Any, *, dtype: str | None = None) -> Handle:
        """Upload a dataset to this server and get its data handle.

        Args:
            data: One of: a list of numbers; a numpy array (sent as typed
                binary, streamed); a path to a ``.csv`` or ``.parquet`` file
                (streamed); a pandas DataFrame or a pyarrow Table (names and
                types kept; sent as Parquet if pyarrow is installed, else as a
                msgpack table); a mapping of column name to list or array.
            dtype: For lists, the numpy dtype to send (default float64).

        Returns:
            The data handle. The data can never be downloaded again.

        Raises:
            FdrtdClientError: If ``data`` cannot be uploaded (a DataFrame column
                of dates or of mixed types, a pyarrow Table without pyarrow...).
            ServerError: If the server refuses it (a malformed file, a limit).
        """
        if isinstance(data, str | os.PathLike):
            path = Path(data)
            parquet = path.suffix.lower() in (".parquet", ".pq")
            with path.open("rb") as handle:
                answer = self._upload_file(handle, "parquet" if parquet else "csv")
        elif _tables.is_dataframe(data) or _tables.is_arrow_table(data):
            columns = _tables.dataframe_columns(data) if _tables.is_dataframe(data) else data
            spool = _tables.parquet_file(columns)
            if spool is not None:
                with spool:
                    answer = self._upload_file(spool, "parquet")
            else:
                answer = self.request(
                    "POST", "/v1/data", params={"format": "msgpack"}, data=wire.packb(columns)
                )
        elif isinstance(data, Mapping):
            answer = self.request(
                "POST", "/v1/data", params={"format": "msgpack"}, data=wire.packb(dict(data))
            )
        else:
            array = np.asarray(
                data, dtype=dtype or (None if isinstance(data, np.ndarray) else np.float64)
            )
            if array.dtype.kind not in "biuf":
                raise FdrtdClientError(
                    "only numeric arrays can be uploaded this way; use a CSV file or a table"
                )
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            params = {
                "format": "raw",
                "dtype": array.dtype.str,
                "shape": ",".join(map(str, array.shape)),
            }
            headers = {"content-type": "application/octet-stream"}
            answer = self.request(
                "POST", "/v1/data", params=params, data=_array_chunks(array), headers=headers
            )
        return Handle(answer["handle"])

    def _upload_file(self, handle: IO[bytes], fmt: str) -> Any:
        """Stream an open csv or parquet file to the server; its answer."""
        kind = "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
        return self.request(
            "POST",
            "/v1/data",
            params={"format": fmt},
            data=_file_chunks(handle),
            headers={"content-type": kind},
        )

    def describe(self, handle: str) -> dict[str, Any]:
        """The schema of one of your datasets (columns, dtypes, rows)."""
        answer: dict[str, Any] = self.request("GET", f"/v1/data/{handle}")
        return answer

    def datasets(self) -> list[dict[str, Any]]:
        """Your datasets on this server."""
        return list(self.request("GET", "/v1/data")["datasets"])

    def release(self, handle: str) -> None:
        """Delete a dataset or a result of yours."""
        kind = "data" if str(handle).startswith("d-") else "results"
        self.request("DELETE", f"/v1/{kind}/{handle}")

    # -- custody -----------------------------------------------------------------

    def catalogue(self) -> list[dict[str, Any]]:
        """The named datasets you may use on this server: schema, coarse rows, version."""
        return list(self.request("GET", "/v1/catalogue")["datasets"])

    def budget(self) -> list[dict[str, Any]]:
        """Your differential privacy budget of each named dataset here: spent and remaining.

        One entry per dataset you may see: ``name``, ``dp`` (whether its owner
        requires differential privacy) and, if so, ``mechanism``, the per-query
        ``epsilon`` (and its floor ``min_epsilon``) and ``delta``, ``spent``,
        ``remaining`` and ``caps``, each ``{"analyst": {epsilon, delta}}``: your
        own spend and cap, and what you may still spend (the smaller of your own
        remainder and the dataset's total). The dataset's owner also sees the
        ``"total"`` of each, and ``analysts``: each analyst's spend.
        """
        return list(self.request("GET", "/v1/budget")["datasets"])

    def publish(self, handle: str, name: str, description: str = "") -> dict[str, Any]:
        """Publish an upload of yours under ``name`` (owners): it joins the catalogue."""
        body = {"handle": str(handle), "name": name, "description": description}
        answer: dict[str, Any] = self.request("POST", "/v1/datasets", body=body)
        return answer

    def withdraw(self, name: str) -> None:
        """Take one of your datasets out of the catalogue; its grants go with it."""
        self.request("DELETE", f"/v1/datasets/{name}")

    def grant(
        self,
        dataset: str,
        grantee: str,
        *,
        functions: Sequence[str] = (),
        not_before: str | None = None,
        not_after: str | None = None,
    ) -> dict[str, Any]:
        """Let the token name ``grantee`` use your dataset (owners, admins).

        Args:
            dataset: The name of one of your datasets.
            grantee: The token name of the analyst on this server.
            functions: Only these ``microservice.function`` patterns (``"smpc.*"``);
                all if empty.
            not_before: When the grant starts (ISO 8601); now if None.
            not_after: When it ends (ISO 8601); never if None.
        """
        body: dict[str, Any] = {"dataset": dataset, "grantee": grantee}
        if functions:
            body["functions"] = list(functions)
        if not_before:
            body["not_before"] = not_before
        if not_after:
            body["not_after"] = not_after
        answer: dict[str, Any] = self.request("POST", "/v1/grants", body=body)
        return answer

    def revoke(self, dataset: str, grantee: str) -> None:
        """Revoke a grant of yours; it applies to the grantee's next request."""
        self.request("DELETE", f"/v1/grants/{dataset}/{grantee}")

    def grants(self) -> list[dict[str, Any]]:
        """The grants of your datasets (all of them, for an admin)."""
        return list(self.request("GET", "/v1/grants")["grants"])

    def add_source(
        self, name: str, owner: str, source: Mapping[str, Any], description: str = ""
    ) -> dict[str, Any]:
        """Register a file, directory or database read in place (admins)."""
        body = {"name": name, "owner": owner, "source": dict(source), "description": description}
        answer: dict[str, Any] = self.request("POST", "/v1/sources", body=body)
        return answer

    def sources(self) -> list[dict[str, Any]]:
        """The registered sources (admins); connection strings are never shown."""
        return list(self.request("GET", "/v1/sources")["sources"])

    # -- computations ------------------------------------------------------------

    def compute(
        self,
        microservice: str,
        function: str,
        session: Mapping[str, Any] | None = None,
        **inputs: Any,
    ) -> Job:
        """Start a computation and return its :class:`Job`.

        A computation of this server alone may finish while the server holds
        the request (up to ``start_wait`` seconds); its result then comes with
        the answer, and :meth:`Job.result` returns it without asking again. A
        multi-party computation (``session`` given) is answered at once: it
        cannot end before the other parties have started theirs, which the
        caller may be about to do (a :class:`Federation` starts all of them
        together, and lets each wait).

        Args:
            microservice: E.g. ``"map"`` or ``"smpc"``.
            function: E.g. ``"aggregate"`` or ``"secure_sum"``.
            session: For multi-party protocols: ``{"id": ..., "parties": [...]}``.
            **inputs: The function's inputs (data handles, column names, options).

        Raises:
            ServerError: If the server refuses to start it (the computation's
                own errors are raised by :meth:`Job.result`).
        """
        wait = self.start_wait if session is None else 0.0
        return self._start(microservice, function, session, inputs, wait=wait)

    def _start(
        self,
        microservice: str,
        function: str,
        session: Mapping[str, Any] | None,
        inputs: Mapping[str, Any],
        *,
        wait: float,
        value: bool = True,
    ) -> Job:
        """Start a computation, letting the server hold the request up to ``wait`` s.

        With ``value=False`` a computation that ends within ``wait`` is
        answered with its state only (enough to know it succeeded).
        """
        body: dict[str, Any] = {
            "microservice": microservice,
            "function": function,
            "inputs": dict(inputs),
        }
        if session is not None:
            body["session"] = dict(session)
        params: dict[str, str] = {}
        if wait > 0:
            params["wait"] = f"{wait:g}"
        if not value:
            params["value"] = "false"
        answer: dict[str, Any] = self.request(
            "POST", "/v1/compute", body=body, params=params, timeout=self.timeout + wait
        )
        job = Job(self, Handle(answer["result"]))
        job._remember(answer, value)
        return job

    def job(self, handle: str) -> Job:
        """A :class:`Job` for a result handle you got earlier."""
        return Job(self, Handle(handle))

    def microservices(self) -> list[dict[str, Any]]:
        """The microservices running on this server."""
        return list(self.request("GET", "/v1/microservices")["microservices"])

    def identity(self) -> dict[str, Any]:
        """The server's public peer entry."""
        answer: dict[str, Any] = self.request("GET", "/v1/identity")
        return answer

    def receipt_keys(self) -> dict[str, bytes]:
        """The public keys this client checks receipts against, by server name.

        Those of the ``federation`` file if one was given; else this server's
        own, as ``GET /v1/identity`` shows it, fetched once and then kept.

        Raises:
            ReceiptError: The federation file is unreadable, or the server
                shows no valid key.
        """
        if self._receipt_keys is None:
            if self.federation is not None:
                self._receipt_keys = receipts.load_keys(self.federation)
            else:
                entry = self.identity()
                name = entry.get("name")
                if not isinstance(name, str):
                    raise ReceiptError("key", f"{self.url} shows no name at /v1/identity")
                what = f"the sign_key {self.url} shows"
                key = receipts.decode_b64(entry.get("sign_key"), 32, what, "key")
                self._receipt_keys = {name: key}
        return dict(self._receipt_keys)

    def directory(self) -> list[dict[str, Any]]:
        """The live members of the federation, if this server keeps its directory.

        Each member is ``{"name", "url", "last_seen" (ISO 8601), "datasets"
        (None: servers do not tell)}``; members silent for three heartbeat
        intervals are not listed. Ask each member's catalogue what you may use
        there: the directory lists servers, not datasets.

        Raises:
            NotFound: If this server keeps no directory.
        """
        return list(self.request("GET", "/v1/directory")["members"])


class Job:
    """A computation started on a server, known by its result handle.

    Once the job has been seen finished (in the answer that started it, or
    in any status), that final view is kept: :meth:`result` then answers
    from it without another request.
    """

    def __init__(self, client: Client, handle: Handle) -> None:
        self.client = client
        self.handle = handle
        self._final: dict[str, Any] | None = None
        self._final_has_value = False
        self._final_at = 0.0
        self.receipt: dict[str, Any] | None = None
        """The finished job's receipt once :meth:`result` returned (save it with
        :func:`fdrtd_client.receipts.save`); a multi-party job's is its
        :class:`FederatedJob`'s."""

    def __repr__(self) -> str:
        return f"Job({self.handle!r} on {self.client.url})"

    def _remember(self, view: dict[str, Any], with_value: bool) -> dict[str, Any]:
        """Keep ``view`` if it is final (and not poorer than the one kept); return it."""
        if view.get("status") not in FINISHED:
            return view
        complete = with_value or view["status"] == "failed"
        if self._final is None or complete or not self._final_has_value:
            self._final, self._final_has_value = view, complete
            self._final_at = time.monotonic()
        return view

    @property
    def versions(self) -> dict[str, Any]:
        """The version of each named dataset the finished job read, by name (else empty)."""
        return dict((self._final or {}).get("datasets") or {})

    def _cached(self, value: bool) -> dict[str, Any] | None:
        """The final view kept, if it holds all that is asked (the value, if ``value``)."""
        if self._final is not None and (self._final_has_value or not value):
            return self._final
        return None

    def status(self, wait: float = 0.0, *, value: bool = True) -> dict[str, Any]:
        """Ask the server for the status, progress and (when done) the value.

        It always sends a request, and waits up to ``wait`` s for the end.

        Args:
            wait: Seconds the server may hold the request until the job ends.
            value: Include the value of a finished job (``False`` for only the state).
        """
        answer: dict[str, Any] = self.client.request(
            "GET",
            f"/v1/results/{self.handle}",
            params={"wait": f"{wait:g}", "value": "true" if value else "false"},
            timeout=self.client.timeout + wait,
        )
        return self._remember(answer, value)

    def result(
        self,
        timeout: float = 60.0,
        *,
        progress: bool | None = None,
        value: bool = True,
        verify_receipt: bool = True,
    ) -> Any:
        """Wait for the computation and return its value, once its receipt verifies.

        A final view already received is used without a request. The server's
        signed statement (see :mod:`fdrtd_client.receipts`) is kept as
        :attr:`receipt`.

        Args:
            timeout: Seconds to wait in all.
            progress: Show a progress line on stderr; default: when it is a terminal.
            value: ``False`` waits for success without downloading the value (returns None).
            verify_receipt: Check the receipt against :meth:`Client.receipt_keys`
                and the value received (``False``: keep it unchecked).

        Raises:
            ResultTimeout: If it is not finished within ``timeout``.
            ServerError: The computation's own error (e.g. ``PartyTimeout``).
            ReceiptError: The receipt is missing or fails a check.
        """
        show = sys.stderr.isatty() if progress is None else progress
        view = self._wait(timeout, value=value, show=show)
        outcome = self._outcome(view, value)
        entry = view.get("receipt")
        if entry is None:
            if verify_receipt:
                raise ReceiptError(
                    "format",
                    f"{self.client.url} sent no receipt with the result {self.handle}; "
                    "pass verify_receipt=False to accept it unchecked",
                )
            return outcome
        checked = outcome if value else ...
        if _session_of(entry) is not None:
            # one party's statement: the whole receipt is its FederatedJob's
            if verify_receipt:
                receipts.verify_statement(entry, self.client.receipt_keys(), value=checked)
            return outcome
        receipt = receipts.assemble({_server_of(entry): entry})
        if verify_receipt:
            receipts.verify_receipt(receipt, self.client.receipt_keys(), value=checked)
        self.receipt = receipt
        return outcome

    def _wait(
        self,
        timeout: float,
        *,
        value: bool,
        show: bool,
        stop: threading.Event | None = None,
    ) -> dict[str, Any]:
        """The final view: kept, or polled for up to ``timeout`` s.

        Raises:
            ResultTimeout: If the job is not finished within ``timeout``.
            _Abandoned: If ``stop`` was set (checked between polls).
        """
        view = self._cached(value)
        if view is not None:
            if show:
                _draw(view, final=True)
            return view
        deadline = time.monotonic() + timeout
        while True:
            if stop is not None and stop.is_set():
                raise _Abandoned(self.handle)
            remaining = deadline - time.monotonic()
            view = self.status(wait=max(0.0, min(MAX_POLL, remaining)), value=value)
            finished = view["status"] in FINISHED
            if show:
                _draw(view, final=finished)
            if finished:
                return view
            if time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"the computation {self.handle} did not finish within {timeout:g} s"
                )

    def _outcome(self, view: dict[str, Any], value: bool) -> Any:
        """The value of a final view (None if ``value`` is False), or its error raised."""
        if view["status"] == "failed":
            error = view.get("error")
            error = error if isinstance(error, dict) else {}
            status = error.get("status")
            status = status if isinstance(status, int) and 400 <= status <= 599 else 500
            detail = error.get("detail")
            detail = detail if isinstance(detail, str) and detail else "the computation failed"
            raise error_from_problem(status, detail, self.client.url)
        return view.get("value") if value else None

    def release(self) -> None:
        """Delete the result on the server (and forget the final view kept here)."""
        self.client.release(self.handle)
        self._final, self._final_has_value = None, False


def _server_of(entry: Any) -> str:
    """The server a signed statement names (checked against its key by verification)."""
    statement = entry.get("statement") if isinstance(entry, Mapping) else None
    server = statement.get("server") if isinstance(statement, Mapping) else None
    if not isinstance(server, str):
        raise ReceiptError("format", "a result's receipt statement names no server")
    return server


def _session_of(entry: Any) -> Any:
    """The session a signed statement names (None for a job of one server)."""
    statement = entry.get("statement") if isinstance(entry, Mapping) else None
    return statement.get("session") if isinstance(statement, Mapping) else None


class _Abandoned(FdrtdClientError):
    """Internal: a wait given up because its caller no longer needs it."""


def _draw(view: Mapping[str, Any], *, final: bool) -> None:
    filled = int(20 * float(view.get("progress", 0)))
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (20 - filled)}] {view['status']:<8}")
    if final:
        sys.stderr.write("\n")
    sys.stderr.flush()


def connect(
    url: str,
    token: str,
    *,
    timeout: float = 30.0,
    verify: bool | str = True,
    cert: str | tuple[str, str] | None = None,
    start_wait: float = 0.25,
    allow_insecure: bool = False,
    federation: str | Path | None = None,
) -> Client:
    """Connect to an fdrtd server (no request is sent until you use it).

    The arguments are those of :class:`Client`.
    """
    return Client(
        url,
        token,
        timeout=timeout,
        verify=verify,
        cert=cert,
        start_wait=start_wait,
        allow_insecure=allow_insecure,
        federation=federation,
    )
