"""One analyst driving several servers at once."""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import Any

import numpy as np

from fdrtd_client import receipts
from fdrtd_client._client import Client, Handle, Job, _draw, _server_of
from fdrtd_client.errors import (
    FdrtdClientError,
    NotFound,
    ReceiptError,
    ServiceUnavailable,
    TransportError,
)

__all__ = ["FederatedDataset", "FederatedJob", "Federation", "combine_aggregates"]


class FederatedDataset:
    """A dataset known by one name on several servers: one dataset to the analyst.

    Each server keeps its own fragment (its own records) under the name; a
    computation on it runs between exactly those servers, each reading its
    own fragment. Get one from :meth:`Federation.dataset`; pass it to
    :meth:`Federation.compute` or :meth:`Federation.map_reduce` in place of
    the inputs by server.

    Attributes:
        name: The dataset's name.
        fragments: The catalogue entry of each server that holds a fragment.
    """

    def __init__(self, name: str, fragments: Mapping[str, Mapping[str, Any]]) -> None:
        self.name = name
        self.fragments = {server: dict(entry) for server, entry in fragments.items()}

    def __repr__(self) -> str:
        return f"FederatedDataset({self.name!r} on {', '.join(self.fragments)})"

    @property
    def parties(self) -> list[str]:
        """The servers that hold a fragment."""
        return list(self.fragments)

    def inputs(self, **common: Any) -> dict[str, dict[str, Any]]:
        """Each fragment's server's inputs: the name as ``data``, and ``common``."""
        return {server: {"data": self.name, **common} for server in self.fragments}


def combine_aggregates(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Reduce the map microservice's local aggregates into federated statistics.

    Returns count, sum, mean, variance (sample, n-1), standard deviation and,
    if histograms were asked for, the summed histogram ``{"edges", "counts",
    "other", "suppressed"}``: a cell suppressed on any server stays
    suppressed (``None``; ``suppressed`` lists its index, ``len(counts)``
    standing for ``other``). There is no minimum or maximum: a server's own
    extremes are single records' values, so map-reduce does not release them;
    the SMPC ``minimum_maximum`` computes the joint ones.
    """

    def cell(histogram: Mapping[str, Any], k: int) -> int | None:
        """Cell ``k`` of one server's histogram (``len(counts)`` is ``other``); None if hidden."""
        counts = histogram["counts"]
        value = counts[k] if k < len(counts) else histogram.get("other", 0)
        # a negative count is how earlier servers marked a suppressed cell
        return None if value is None or int(value) < 0 else int(value)

    count = sum(int(p["count"]) for p in parts)
    total = np.sum([np.asarray(p["sum"], dtype=np.float64) for p in parts], axis=0)
    squares = np.sum([np.asarray(p["sum_squares"], dtype=np.float64) for p in parts], axis=0)
    mean = total / count
    variance = (squares - count * mean * mean) / (count - 1) if count > 1 else np.nan * mean
    result: dict[str, Any] = {
        "count": count,
        "sum": total,
        "mean": mean,
        "variance": variance,
        "standard_deviation": np.sqrt(np.maximum(variance, 0.0)),
    }
    if parts and all("histogram" in p for p in parts):
        cells: list[int | None] = []
        for k in range(len(parts[0]["histogram"]["counts"]) + 1):
            column = [cell(p["histogram"], k) for p in parts]
            cells.append(None if None in column else sum(c for c in column if c is not None))
        result["histogram"] = {
            "edges": parts[0]["histogram"]["edges"],
            "counts": cells[:-1],
            "other": cells[-1],
            "suppressed": [k for k, c in enumerate(cells) if c is None],
        }
    for key, value in list(result.items()):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            result[key] = value.item()
    return result


class FederatedJob:
    """The same computation running on several servers (one session).

    Attributes:
        jobs: One :class:`Job` per server, in the federation's server order.
        session: The session id the servers share.
        parties: The servers' names, in the order of ``jobs`` (None: as
            their statements name them).
        receipt: The joint receipt, every party's statement and cosignature,
            once :meth:`result` or :meth:`results` returned (save it with
            :func:`fdrtd_client.receipts.save`).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        session: str,
        *,
        federation: Federation | None = None,
        parties: Sequence[str] | None = None,
    ) -> None:
        self.jobs = list(jobs)
        self.session = session
        self._federation = federation
        self.parties = None if parties is None else list(parties)
        self.receipt: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"FederatedJob({self.session!r}, {len(self.jobs)} servers)"

    @property
    def versions(self) -> dict[str, dict[str, Any]]:
        """The dataset versions each server's finished job read: by server URL, then name."""
        return {job.client.url: job.versions for job in self.jobs}

    def results(
        self, timeout: float = 60.0, *, progress: bool | None = None, verify_receipt: bool = True
    ) -> list[Any]:
        """Each server's result, in server order, once the joint receipt verifies.

        Each value must hash to its own server's ``output_sha256`` and to the
        common ``joint_sha256`` (see :meth:`result`).

        Raises:
            ServerError: The first error any server reports, as soon as it does
                (the other servers' jobs are not waited for).
            ResultTimeout: If a server's job is not finished within ``timeout``.
            ReceiptError: The receipt is missing or fails a check (see :meth:`result`).
        """
        views = self._finish(timeout, progress, [True] * len(self.jobs))
        values = [job._outcome(view, True) for job, view in zip(self.jobs, views, strict=True)]
        self._receipt(views, values, verify_receipt)
        return values

    def result(
        self, timeout: float = 60.0, *, progress: bool | None = None, verify_receipt: bool = True
    ) -> Any:
        """The joint result: the first server's value, once every server has succeeded.

        Every server computes the same result but for the fields that are each
        party's own (:data:`fdrtd_client.receipts.PARTY_FIELDS`: its statement of
        its differential-privacy spend); only the first one's is downloaded.
        Use :meth:`results` to fetch (and compare) all of them.

        Every party's signed statement is gathered into one receipt, each party
        cosigns it, and it is checked (:func:`fdrtd_client.receipts.verify_receipt`)
        against the keys of the federation file, or those the servers showed
        (:meth:`Federation.receipt_keys`); the value received must hash to the
        first party's ``output_sha256`` and to the common ``joint_sha256``. The
        receipt is then kept as :attr:`receipt`. ``verify_receipt=False`` keeps
        it unchecked and not cosigned.

        Raises:
            ServerError: The first error any server reports, as soon as it does.
            ResultTimeout: If a server's job is not finished within ``timeout``.
            ReceiptError: The receipt is missing or fails a check.
        """
        wanted = [True] + [False] * (len(self.jobs) - 1)
        views = self._finish(timeout, progress, wanted)
        value = self.jobs[0]._outcome(views[0], True)
        self._receipt(views, [value], verify_receipt)
        return value

    def _receipt(self, views: list[dict[str, Any]], values: list[Any], verify: bool) -> None:
        """Assemble the joint receipt of the final views; check it and have it cosigned."""
        entries: dict[str, Any] = {}
        for index, view in enumerate(views):
            entry = view.get("receipt")
            if entry is None:
                if not verify:
                    return
                raise ReceiptError(
                    "format",
                    f"{self.jobs[index].client.url} sent no receipt with its result; pass "
                    "verify_receipt=False to accept the result unchecked",
                )
            entries[self.parties[index] if self.parties else _server_of(entry)] = entry
        receipt = receipts.assemble(entries)
        # each value received checked against its own party's statement (both digests):
        # results() fetched every party's, result() the first party's only
        received = dict(zip(entries, values, strict=False))
        kept = self.receipt
        if (
            verify
            and kept is not None
            and kept["cosignatures"]
            and receipts.canonical(kept["statements"]) == receipts.canonical(receipt["statements"])
        ):
            # cosigned already (by result(), say): the values are all that is new
            receipts.verify_receipt(kept, self._keys(), values=received)
            return
        if verify:
            keys = self._keys()
            # checked before the parties are asked to cosign: a clearer error, sooner
            receipts.verify_receipt(receipt, keys, cosignatures=False, values=received)
            answers = self._each_job(
                lambda job: job.client.request(
                    "POST", "/v1/receipts/cosign", body={"receipt": receipt}
                )
            )
            receipt["cosignatures"] = {
                name: answer.get("cosignature")
                for name, answer in zip(entries, answers, strict=True)
            }
            receipts.verify_receipt(receipt, keys, values=received)
        self.receipt = receipt

    def _keys(self) -> dict[str, bytes]:
        """The keys to check the receipt against: the federation's, else each job's server's."""
        if self._federation is not None:
            return self._federation.receipt_keys()
        keys: dict[str, bytes] = {}
        for job in self.jobs:
            keys.update(job.client.receipt_keys())
        return keys

    def _each_job(self, function: Callable[[Job], Any]) -> list[Any]:
        """``function(job)`` for every job; concurrently, in the federation's pool if any."""
        if self._federation is None:
            return [function(job) for job in self.jobs]
        pool = self._federation._executor()
        futures = [pool.submit(function, job) for job in self.jobs]
        wait(futures)
        return [future.result() for future in futures]

    def _finish(
        self, timeout: float, progress: bool | None, wanted: list[bool]
    ) -> list[dict[str, Any]]:
        """Every job's final view (with its value where ``wanted``), or the first error raised.

        Views already received are used as they are; only the jobs not known
        to be finished are polled, concurrently.
        """
        show = sys.stderr.isatty() if progress is None else progress
        deadline = time.monotonic() + timeout
        known = [job._cached(value) for job, value in zip(self.jobs, wanted, strict=True)]
        self._raise_first_failure(known)
        pending = [index for index, view in enumerate(known) if view is None]
        if show and known[0] is not None:
            _draw(known[0], final=True)
        if len(pending) == 1:
            # one job left to wait for: poll it here, no thread needed
            index = pending[0]
            known[index] = self.jobs[index]._wait(
                timeout, value=wanted[index], show=show and index == 0
            )
            self._raise_first_failure(known)
        elif pending:
            stop = threading.Event()
            # a FederatedJob made by hand has no federation: it uses a pool of its own
            own = None if self._federation is not None else ThreadPoolExecutor(len(pending))
            pool = self._federation._executor() if self._federation is not None else own
            assert pool is not None
            try:
                futures = {
                    pool.submit(
                        self.jobs[index]._wait,
                        max(0.0, deadline - time.monotonic()),
                        value=wanted[index],
                        show=show and index == 0,
                        stop=stop,
                    ): index
                    for index in pending
                }
                for future in as_completed(futures):
                    known[futures[future]] = future.result()
                    self._raise_first_failure(known)  # at once if this server's job failed
            finally:
                stop.set()  # polls still running end at their next turn
                if own is not None:
                    own.shutdown(wait=False, cancel_futures=True)
        return [view for view in known if view is not None]

    def _raise_first_failure(self, views: Sequence[dict[str, Any] | None]) -> None:
        """Raise the error of the failed job whose end was learnt first, if any."""
        failed = [
            (self.jobs[index]._final_at, index, view)
            for index, view in enumerate(views)
            if view is not None and view["status"] == "failed"
        ]
        if failed:
            _, index, view = min(failed, key=lambda entry: entry[:2])
            self.jobs[index]._outcome(view, False)


class Federation:
    """Several servers, one analyst, one token per server.

    A federation keeps a small thread pool (made when first needed) to talk to
    its servers concurrently; :meth:`close` ends it and the clients'
    connections, as does leaving a ``with`` block.

    Args:
        clients: One :class:`Client` per server, keyed by the server's name in
            the federation (the names the servers know each other by).
        federation: A federation file listing every server with its public
            key, against which result receipts are checked (see
            :meth:`receipt_keys`).
    """

    def __init__(
        self, clients: Mapping[str, Client], *, federation: str | Path | None = None
    ) -> None:
        if len(clients) < 2:
            raise FdrtdClientError("a federation needs at least two servers")
        self.clients = dict(clients)
        self.federation = None if federation is None else Path(federation)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls,
        servers: Mapping[str, tuple[str, str]],
        *,
        timeout: float = 30.0,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        start_wait: float = 0.25,
        allow_insecure: bool = False,
        federation: str | Path | None = None,
    ) -> Federation:
        """A federation of clients made alike: one ``(url, token)`` per server name.

        The keyword arguments are those of :class:`Client`, passed on to each:
        ``verify`` (the federation's CA bundle, for servers with certificates
        of a private CA) and ``cert`` (your client certificate, for servers
        that require one) are the usual ones to give. ``federation`` is the
        federation file the receipts are verified against (as for
        :class:`Federation`).

        Example::

            fed = Federation.connect(
                {"alpha": ("https://alpha.example:8443", token_a), ...},
                verify="federation-ca.pem",
                cert=("analyst.pem", "analyst.key"),
            )
        """
        return cls(
            {
                name: Client(
                    url,
                    token,
                    timeout=timeout,
                    verify=verify,
                    cert=cert,
                    start_wait=start_wait,
                    allow_insecure=allow_insecure,
                )
                for name, (url, token) in servers.items()
            },
            federation=federation,
        )

    def __repr__(self) -> str:
        return f"Federation({', '.join(self.clients)})"

    @property
    def parties(self) -> list[str]:
        """The server names, in the order the protocols use."""
        return list(self.clients)

    def close(self) -> None:
        """End the thread pool and close every client's HTTP connections.

        The federation stays usable: a later call makes a new pool and new
        connections.
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receipt_keys(self) -> dict[str, bytes]:
        """The public keys result receipts are checked against, by server name.

        Those of the ``federation`` file if one was given; else each server's
        own key as its ``GET /v1/identity`` shows it, fetched once per client
        (trust on first use), which must be under the name this federation
        knows the server by.

        Raises:
            ReceiptError: The file is unreadable, or a server shows another name.
        """
        if self.federation is not None:
            return receipts.load_keys(self.federation)
        keys: dict[str, bytes] = {}
        for name, client in self.clients.items():
            theirs = client.receipt_keys()
            if name not in theirs:
                raise ReceiptError(
                    "key",
                    f"the server {client.url} does not show a key for the name {name!r} this "
                    "federation knows it by: check the name, or give a federation file",
                )
            keys[name] = theirs[name]
        return keys

    def _executor(self) -> ThreadPoolExecutor:
        """The federation's thread pool, made on first use."""
        with self._lock:
            if self._pool is None:
                # twice the servers: polls given up after an error (which end at
                # their next turn) never hold up the next call's requests
                self._pool = ThreadPoolExecutor(
                    max_workers=2 * len(self.clients), thread_name_prefix="fdrtd-federation"
                )
            return self._pool

    def _each(self, calls: Mapping[str, Any], function: Any) -> dict[str, Any]:
        """``function(client, argument)`` for each server named in ``calls``, concurrently.

        Every call ends before this returns; then the first error in server
        order is raised.
        """
        (name, argument), *rest = calls.items()
        futures = {
            other: self._executor().submit(function, self.clients[other], value)
            for other, value in rest
        }
        try:
            # the first call runs in this thread, which would only wait otherwise
            first = function(self.clients[name], argument)
        finally:
            wait(futures.values())
        return {name: first, **{other: future.result() for other, future in futures.items()}}

    def catalogue(self) -> list[dict[str, Any]]:
        """Every dataset across the federation that you may use, each with its ``server``.

        The federation directory (:meth:`directory`) says which members are
        alive; each live member you hold a token for is asked for its own
        catalogue: what a server lists is what its owners granted you. Without
        a directory, every server of this federation is asked. A server that
        cannot be reached is left out.
        """
        try:
            live = {member["name"] for member in self.directory()}
            asked = [name for name in self.parties if name in live]
        except FdrtdClientError:  # no directory in this federation
            asked = self.parties

        def ask(client: Client, _: None) -> list[dict[str, Any]]:
            try:
                return client.catalogue()
            except (TransportError, ServiceUnavailable):
                return []

        if not asked:
            return []
        found = self._each(dict.fromkeys(asked), ask)
        return [{**entry, "server": server} for server in asked for entry in found[server]]

    def dataset(self, name: str) -> FederatedDataset:
        """The dataset ``name`` as one, over every server that holds a fragment of it.

        Raises:
            FdrtdClientError: If none of your servers lets you use it.
        """
        fragments = {
            entry["server"]: entry for entry in self.catalogue() if entry.get("name") == name
        }
        if not fragments:
            raise FdrtdClientError(f"no server of this federation lets you use '{name}'")
        return FederatedDataset(name, fragments)

    def directory(self) -> list[dict[str, Any]]:
        """The live members, from the first of the federation's servers that keeps a directory.

        Servers are asked in the federation's order; one that keeps no
        directory (404), or cannot be reached, is passed over, so that with
        several directories one being down does not matter. See
        :meth:`Client.directory`.

        Raises:
            FdrtdClientError: If no server answered with a directory.
            ServerError: If a server refuses otherwise (e.g. 401, a bad token).
        """
        unreachable: list[str] = []
        for name, client in self.clients.items():
            try:
                return client.directory()
            except NotFound:
                continue
            except TransportError:
                unreachable.append(name)
        also = f" ({', '.join(unreachable)} could not be reached)" if unreachable else ""
        raise FdrtdClientError(
            f"none of the servers {', '.join(self.clients)} keeps a federation directory"
            f"{also}; ask the admins which server has 'directory = true'"
        )

    def upload(self, datasets: Mapping[str, Any]) -> dict[str, Handle]:
        """Upload each party's dataset to its own server; returns the handles."""
        return self._each(datasets, lambda client, data: client.upload(data))

    def map_reduce(
        self,
        handles: Mapping[str, str] | FederatedDataset,
        *,
        column: str | None = None,
        bins: Sequence[float] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Federated statistics by map-reduce: local aggregates, combined here.

        Each server's own aggregates are disclosed to you; use :meth:`compute`
        with an SMPC protocol when they must stay secret.
        """
        if isinstance(handles, FederatedDataset):
            handles = dict.fromkeys(handles.parties, handles.name)
        inputs: dict[str, Any] = {"column": column}
        if bins is not None:
            inputs["bins"] = list(bins)

        def run(client: Client, handle: str) -> Any:
            return client.compute("map", "aggregate", data=handle, **inputs).result(
                timeout, progress=False
            )

        parts = self._each(handles, run)
        return combine_aggregates(list(parts.values()))

    def compute(
        self,
        microservice: str,
        function: str,
        inputs: Mapping[str, Mapping[str, Any]] | FederatedDataset,
        *,
        session: str | None = None,
        **common: Any,
    ) -> FederatedJob:
        """Start one multi-party computation on every server.

        All servers are asked at once, each holding the request up to its
        client's ``start_wait``: a fast computation has ended by the time this
        returns, and :meth:`FederatedJob.result` needs no further request. Only
        the first server sends the value; the others say whether they succeeded.

        Args:
            microservice: E.g. ``"smpc"``.
            function: E.g. ``"secure_sum"``.
            inputs: Each server's own inputs (its data handle...), by server name;
                or a :class:`FederatedDataset`: then the parties are the servers that
                hold a fragment of it, each reading its own.
            session: The session id; a fresh random one by default.
            **common: Inputs shared by every server.

        Raises:
            ServerError: If a server refuses to start the computation.
        """
        if isinstance(inputs, FederatedDataset):
            inputs = inputs.inputs()
        unknown = set(inputs) - set(self.clients)
        if unknown:
            raise FdrtdClientError(
                f"no server named {', '.join(sorted(unknown))} in this federation"
            )
        parties = [name for name in self.parties if name in inputs]
        if len(parties) < 2:
            raise FdrtdClientError("a computation needs inputs for at least two servers")
        session_id = session or secrets.token_hex(16)
        spec = {"id": session_id, "parties": parties}
        first = parties[0]

        def start(client: Client, call: tuple[bool, Mapping[str, Any]]) -> Job:
            with_value, own = call
            return client._start(
                microservice,
                function,
                spec,
                {**common, **own},
                wait=client.start_wait,
                value=with_value,
            )

        calls = {name: (name == first, inputs[name]) for name in parties}
        jobs = self._each(calls, start)
        return FederatedJob(
            [jobs[name] for name in parties], session_id, federation=self, parties=parties
        )
