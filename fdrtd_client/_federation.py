"""One analyst driving several servers at once."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np

from fdrtd_client._client import Client, Handle, Job
from fdrtd_client.errors import FdrtdClientError

__all__ = ["FederatedJob", "Federation", "combine_aggregates"]


def combine_aggregates(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Reduce the map microservice's local aggregates into federated statistics.

    Returns count, sum, mean, variance (sample, n-1), standard deviation,
    minimum, maximum and, if histograms were asked for, the summed histogram
    (a cell suppressed on any server stays suppressed, -1).
    """
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
        "minimum": np.min([np.asarray(p["minimum"]) for p in parts], axis=0),
        "maximum": np.max([np.asarray(p["maximum"]) for p in parts], axis=0),
    }
    if all("histogram" in p for p in parts):
        counts = np.array([np.asarray(p["histogram"]["counts"]) for p in parts])
        merged = np.where((counts < 0).any(axis=0), -1, counts.sum(axis=0))
        result["histogram"] = {"edges": parts[0]["histogram"]["edges"], "counts": merged}
    for key, value in list(result.items()):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            result[key] = value.item()
    return result


class FederatedJob:
    """The same computation running on several servers (one session)."""

    def __init__(self, jobs: Sequence[Job], session: str) -> None:
        self.jobs = list(jobs)
        self.session = session

    def results(self, timeout: float = 60.0, *, progress: bool | None = None) -> list[Any]:
        """Each server's result, in server order.

        Raises:
            ServerError: The first error any server reports, as soon as it does
                (the other servers' jobs are not waited for).
        """
        pool = ThreadPoolExecutor(max_workers=len(self.jobs))
        try:
            futures = [pool.submit(job.result, timeout, progress=False) for job in self.jobs[1:]]
            first = pool.submit(self.jobs[0].result, timeout, progress=progress)
            ordered = [first, *futures]
            for future in as_completed(ordered):
                future.result()  # raises at once if this server's job failed
            return [future.result() for future in ordered]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def result(self, timeout: float = 60.0, *, progress: bool | None = None) -> Any:
        """The joint result: the first server's value, once every server has succeeded.

        Every server computes the same result; only the first one's is
        downloaded. Use :meth:`results` to fetch (and compare) all of them.

        Raises:
            ServerError: The first error any server reports, as soon as it does.
        """
        pool = ThreadPoolExecutor(max_workers=len(self.jobs))
        try:
            first = pool.submit(self.jobs[0].result, timeout, progress=progress)
            others = [
                pool.submit(job.result, timeout, progress=False, value=False)
                for job in self.jobs[1:]
            ]
            for future in as_completed([first, *others]):
                future.result()  # raises at once if this server's job failed
            return first.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class Federation:
    """Several servers, one analyst, one token per server.

    Args:
        clients: One :class:`Client` per server, keyed by the server's name in
            the federation (the names the servers know each other by).
    """

    def __init__(self, clients: Mapping[str, Client]) -> None:
        if len(clients) < 2:
            raise FdrtdClientError("a federation needs at least two servers")
        self.clients = dict(clients)

    @property
    def parties(self) -> list[str]:
        """The server names, in the order the protocols use."""
        return list(self.clients)

    def _each(self, calls: Mapping[str, Any], function: Any) -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = {
                name: pool.submit(function, self.clients[name], value)
                for name, value in calls.items()
            }
            return {name: future.result() for name, future in futures.items()}

    def upload(self, datasets: Mapping[str, Any]) -> dict[str, Handle]:
        """Upload each party's dataset to its own server; returns the handles."""
        return self._each(datasets, lambda client, data: client.upload(data))

    def map_reduce(
        self,
        handles: Mapping[str, str],
        *,
        column: str | None = None,
        bins: Sequence[float] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Federated statistics by map-reduce: local aggregates, combined here.

        Each server's own aggregates are disclosed to you; use :meth:`compute`
        with an SMPC protocol when they must stay secret.
        """
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
        inputs: Mapping[str, Mapping[str, Any]],
        *,
        session: str | None = None,
        **common: Any,
    ) -> FederatedJob:
        """Start one multi-party computation on every server.

        Args:
            microservice: E.g. ``"smpc"``.
            function: E.g. ``"secure_sum"``.
            inputs: Each server's own inputs (its data handle...), by server name.
            session: The session id; a fresh random one by default.
            **common: Inputs shared by every server.
        """
        missing = set(self.clients) - set(inputs)
        if missing:
            raise FdrtdClientError(f"no inputs for server(s): {', '.join(sorted(missing))}")
        session_id = session or secrets.token_hex(16)
        spec = {"id": session_id, "parties": self.parties}

        def start(client: Client, own: Mapping[str, Any]) -> Job:
            return client.compute(microservice, function, session=spec, **{**common, **own})

        jobs = self._each(inputs, start)
        return FederatedJob([jobs[name] for name in self.parties], session_id)
