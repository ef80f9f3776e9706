"""The reference systems of the benchmarks: SIMON (Federated Secure Computing) and MPyC.

``bench/run.py`` measures fdrtd first and then calls
:func:`add_reference_results`, which runs the same computations on the two
reference systems, on this machine and on 127.0.0.1 only, and writes their
times next to fdrtd's: the rows with a ``key`` ("scalar_sum", "vector_sum",
"univariate_100000", "univariate_1000000") get the columns "SIMON", "MPyC" and
"ratio" (how many times faster fdrtd is; below 1x it is slower), and a section
"Reference systems" lists what has no fdrtd counterpart.

SIMON (``federatedsecure-simon`` on ``federatedsecure-server``): three servers,
each a separate process (``_simon_server.py``: the server's ``Bus`` behind the
REST API of its original connexion web server, on Starlette/uvicorn). Three
client threads call ``compute(microprotocol=..., data=..., network=...)`` at
the same time, as SIMON's examples do, one per party; a measurement runs from
starting the threads to the last party's downloaded result. SIMON has no
upload step, so the values travel with the call. Its SecureSum adds scalars
only: the vector sum is "not supported".

MPyC (``mpyc``) is a library, not a server: every party is a process
(``_mpyc_sum.py``) that runs the whole program. Its cells give the in-protocol
time (parties connected, from a synchronised round to the opened result); the
"Reference systems" section adds the time from starting the three processes to
their exit (Python start, imports, connecting, data, protocol).

A reference that is not installed, fails or runs over its time limit says so
in its cell; nothing is left out silently.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PARTIES = 3
SIMON_LIMIT = 120.0  # seconds for one SIMON computation
MPYC_SHARED_LIMIT = 60.0  # seconds for MPyC's all-values-secret-shared statistics
KEYS = ("scalar_sum", "vector_sum", "univariate_100000", "univariate_1000000")
RATE_ROW = "sequential secure sums per second"


@dataclass
class Cell:
    """One reference measurement: the text of its cell, and the number behind it.

    ``value`` is seconds for a time and 1/s for a rate; None when there is
    nothing to compare (not installed, failed, not supported, over the limit).
    """

    text: str
    value: float | None = None


class Failed(Exception):
    """A reference computation failed or ran over its limit; the message is the cell."""


# --------------------------------------------------------------------------- helpers


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def _format_seconds(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _parse(text: str) -> float | None:
    """Seconds (or 1/s for a rate) from an fdrtd cell such as "812.0 ms" or "125 /s"."""
    match = re.match(r"\s*([0-9.]+)\s*(ms|µs|us|s|/s)\b", str(text))
    if match is None:
        return None
    number = float(match.group(1))
    return number * {"ms": 1e-3, "µs": 1e-6, "us": 1e-6, "s": 1.0, "/s": 1.0}[match.group(2)]


def _factor(factor: float) -> str:
    if factor >= 10:
        return f"{factor:.0f}x"
    if factor >= 1:
        return f"{factor:.1f}x"
    return f"{factor:.2f}x"


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace("|", "/")  # the cell sits in a markdown table
    return text if len(text) <= 120 else text[:117] + "..."


def _failed(error: BaseException) -> Cell:
    if isinstance(error, Failed):
        return Cell(str(error))
    return Cell(f"failed: {_reason(error)}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _stop(processes: list[subprocess.Popen[Any]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- SIMON


@contextlib.contextmanager
def simon_network(scratch: Path) -> Iterator[list[str]]:
    """Three SIMON servers, each in its own process on 127.0.0.1.

    Args:
        scratch: a directory for the servers' stderr.

    Yields:
        The servers' base URLs, party 0 first.
    """
    ports = _free_ports(PARTIES)
    processes: list[subprocess.Popen[Any]] = []
    logs = [scratch / f"simon-{port}.log" for port in ports]
    try:
        for port, log in zip(ports, logs, strict=True):
            with log.open("wb") as stderr:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(HERE / "_simon_server.py"), "--port", str(port)],
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                )
        urls = [f"http://{HOST}:{port}" for port in ports]
        deadline = time.monotonic() + 60
        for url, process, log in zip(urls, processes, logs, strict=True):
            while True:
                if process.poll() is not None:
                    raise Failed(f"failed: server exited: {_reason(Exception(_tail(log)))}")
                try:
                    with socket.create_connection((HOST, int(url.rsplit(":", 1)[1])), 1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise Failed("failed: server did not start in 60 s") from None
                    time.sleep(0.1)
        yield urls
    finally:
        _stop(processes)


def simon_compute(urls: list[str], microprotocol: str, data: list[Any], limit: float) -> Any:
    """One SIMON computation: every party calls ``compute`` on its own server at once.

    Args:
        urls: the servers, party 0 first.
        microprotocol: a SIMON microprotocol, e.g. "SecureSum".
        data: each party's input.
        limit: seconds to wait for all parties.

    Returns:
        Party 0's downloaded result.

    Raises:
        Failed: a party failed, or not every party finished within ``limit``.
    """
    import federatedsecure.client

    network_id = str(uuid.uuid4())  # SIMON's broadcasts are keyed by it: fresh each run
    results: list[Any] = [None] * PARTIES
    errors: list[BaseException] = []

    def party(index: int) -> None:
        try:
            api = federatedsecure.client.Api(urls[index])
            simon = api.create(protocol="Simon")
            network = {"nodes": urls, "myself": index, "uuid": network_id}
            result = simon.compute(microprotocol=microprotocol, data=data[index], network=network)
            results[index] = api.download(result)
        except BaseException as error:  # reported to the caller
            errors.append(error)

    # daemon threads: the client has no timeouts; a stuck party ends with its server
    threads = [threading.Thread(target=party, args=(i,), daemon=True) for i in range(PARTIES)]
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise Failed(f"failed: {_reason(errors[0])}")
    if any(thread.is_alive() for thread in threads):
        raise Failed(f"> {limit:.0f} s")
    return results[0]


def measure_simon(quick: bool, scratch: Path) -> dict[str, Cell]:
    """Run the SIMON measurements.

    Args:
        quick: fewer repetitions and no 1,000,000-value statistics.
        scratch: a directory for the servers' logs.

    Returns:
        Cells by key ("scalar_sum", "rate", "vector_sum", "univariate_<n>").
    """
    sizes = (100_000,) if quick else (100_000, 1_000_000)
    keys = ("scalar_sum", "rate", "vector_sum", *(f"univariate_{n}" for n in sizes))
    modules = ("federatedsecure.client", "federatedsecure.server", "federatedsecure.services")
    if any(importlib.util.find_spec(module) is None for module in modules):
        return dict.fromkeys(keys, Cell("not installed"))
    cells = {"vector_sum": Cell("not supported")}

    def scalar_sum(urls: list[str]) -> float:
        start = time.perf_counter()
        result = simon_compute(urls, "SecureSum", [1.0, 2.0, 3.0], 30)
        elapsed = time.perf_counter() - start
        if result["result"]["sum"] != 6.0:
            raise Failed(f"failed: wrong sum {result['result']['sum']!r}")
        return elapsed

    try:
        with simon_network(scratch) as urls:
            for _ in range(2):
                scalar_sum(urls)
            samples = [scalar_sum(urls) for _ in range(10 if quick else 30)]
        cells["scalar_sum"] = Cell(_format_seconds(p50(samples)), p50(samples))
        rate = len(samples) / sum(samples)
        cells["rate"] = Cell(f"{rate:.1f} /s", rate)
    except Exception as error:
        cells["scalar_sum"] = cells["rate"] = _failed(error)

    rng = np.random.default_rng(2)
    for size in sizes:
        key = f"univariate_{size}"
        data = [rng.normal(120, 15, size) for _ in range(PARTIES)]
        lists = [column.tolist() for column in data]  # SIMON's client sends JSON
        values = np.concatenate(data)
        samples = []
        try:
            with simon_network(scratch) as urls:
                for _ in range(1 if quick or size > 100_000 else 3):
                    start = time.perf_counter()
                    result = simon_compute(urls, "StatisticsUnivariate", lists, SIMON_LIMIT)
                    samples.append(time.perf_counter() - start)
                    _check_univariate(result["result"], values)
            cells[key] = Cell(_format_seconds(p50(samples)), p50(samples))
        except Exception as error:
            cells[key] = _failed(error)
            if str(error).startswith(">"):
                break  # a larger size would only take longer
    return cells


def _check_univariate(result: dict[str, Any], values: np.ndarray) -> None:
    if not (
        result["samples"] == values.size
        and np.isclose(result["mean"], values.mean(), rtol=1e-9)
        and np.isclose(result["variance"], values.var(ddof=1), rtol=1e-6)
    ):
        raise Failed("failed: wrong mean or variance")


# --------------------------------------------------------------------------- MPyC


@dataclass
class MpycRun:
    """One three-process MPyC run: in-protocol times (party 0) and the processes' wall time."""

    seconds: list[float]
    wall: float
    error: float


def run_mpyc(task: str, size: int, repeat: int, limit: float, scratch: Path) -> MpycRun:
    """Start the three MPyC parties of ``_mpyc_sum.py`` on 127.0.0.1 and wait for them.

    Args:
        task: "scalar", "vector", "univariate" or "univariate_shared".
        size: the elements or values per party.
        repeat: repetitions inside the one session.
        limit: seconds until the processes are stopped.
        scratch: a directory for the parties' output.

    Returns:
        The times and the largest deviation from the plain computation.

    Raises:
        Failed: a party failed, or the run exceeded ``limit``.
    """
    ports = _free_ports(PARTIES)
    addresses = [arg for port in ports for arg in ("-P", f"{HOST}:{port}")]
    outputs = [scratch / f"mpyc-{task}-{size}-{i}.log" for i in range(PARTIES)]
    processes: list[subprocess.Popen[Any]] = []
    start = time.perf_counter()
    try:
        for index, output in enumerate(outputs):
            with output.open("wb") as sink:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "_mpyc_sum.py"),
                            *addresses,
                            "-I",
                            str(index),
                            "--no-log",
                            "--task",
                            task,
                            "--size",
                            str(size),
                            "--repeat",
                            str(repeat),
                        ],
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + limit
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise Failed(f"> {limit:.0f} s") from None
        wall = time.perf_counter() - start
    finally:
        _stop(processes)
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise Failed(f"failed: {_reason(Exception(_tail(output)))}")
    lines = [line for line in outputs[0].read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise Failed(f"failed: no result: {_reason(Exception(_tail(outputs[0])))}")
    result = json.loads(lines[-1])
    return MpycRun(result["seconds"], wall, result["error"])


def measure_mpyc(quick: bool, scratch: Path) -> tuple[dict[str, Cell], list[Row]]:
    """Run the MPyC measurements.

    Args:
        quick: the fdrtd quick sizes (100,000-element vector, no 1,000,000 values).
        scratch: a directory for the parties' output.

    Returns:
        Cells by key, and the rows of the "Reference systems" section.
    """
    vector_size = 100_000 if quick else 1_000_000
    sizes = (100_000,) if quick else (100_000, 1_000_000)
    repeat = 10 if quick else 30
    names = {
        "scalar": f"MPyC: {repeat} scalar sums, {PARTIES} processes from start to exit",
        "vector": f"MPyC: {vector_size:,}-element vector sum, processes from start to exit",
        "shared": "MPyC: mean/variance of 100,000 values per party, every value "
        "secret-shared (SecFxp(64, 16), secure inner product)",
        "checks": "MPyC: largest deviation of its opened results from the plain computation",
    }
    if importlib.util.find_spec("mpyc") is None:
        keys = ["scalar_sum", "rate", "vector_sum", *(f"univariate_{n}" for n in sizes)]
        missing = Cell("not installed")
        return dict.fromkeys(keys, missing), [
            {"name": name, "MPyC": missing.text} for name in names.values()
        ]

    cells: dict[str, Cell] = {}
    rows: list[Row] = []
    checks: list[str] = []

    def check(name: str, run: MpycRun, tolerance: float) -> None:
        if not run.error <= tolerance:
            raise Failed(f"failed: {name} off by {run.error:.3g}")
        checks.append(f"{name} {run.error:.1g}")

    try:
        run = run_mpyc("scalar", 1, repeat, 120, scratch)
        check("sum", run, 1e-4)
        cells["scalar_sum"] = Cell(
            f"{_format_seconds(p50(run.seconds))} (in protocol)", p50(run.seconds)
        )
        rate = len(run.seconds) / sum(run.seconds)
        cells["rate"] = Cell(f"{rate:.0f} /s (in protocol)", rate)
        wall = _format_seconds(run.wall)
    except Exception as error:
        cells["scalar_sum"] = cells["rate"] = _failed(error)
        wall = cells["scalar_sum"].text
    rows.append({"name": names["scalar"], "MPyC": wall})

    try:
        run = run_mpyc("vector", vector_size, 1, 600, scratch)
        check("vector", run, 1e-3)
        seconds = run.seconds[0]
        cells["vector_sum"] = Cell(f"{_format_seconds(seconds)} (in protocol)", seconds)
        wall = _format_seconds(run.wall)
    except Exception as error:
        cells["vector_sum"] = _failed(error)
        wall = cells["vector_sum"].text
    rows.append({"name": names["vector"], "MPyC": wall})

    for size in sizes:
        key = f"univariate_{size}"
        try:
            run = run_mpyc("univariate", size, 3, 120, scratch)
            check(f"mean/variance {size:,}", run, 1e-6)
            cells[key] = Cell(
                f"{_format_seconds(p50(run.seconds))} (in protocol, mean/variance only)",
                p50(run.seconds),
            )
        except Exception as error:
            cells[key] = _failed(error)

    try:
        run = run_mpyc("univariate_shared", 100_000, 1, MPYC_SHARED_LIMIT, scratch)
        check("shared mean/variance", run, 1e-3)
        shared = f"{_format_seconds(run.seconds[0])} (in protocol)"
    except Exception as error:
        shared = _failed(error).text
    rows.append({"name": names["shared"], "MPyC": shared})
    rows.append({"name": names["checks"], "MPyC": ", ".join(checks) or "none passed"})
    return cells, rows


# --------------------------------------------------------------------------- the table


def _ratio(fdrtd: float | None, references: dict[str, Cell], rate: bool) -> str:
    parts = []
    for name, cell in references.items():
        if fdrtd and cell.value:
            factor = fdrtd / cell.value if rate else cell.value / fdrtd
            parts.append(f"{_factor(factor)} vs {name}")
    return ", ".join(parts)


def add_reference_results(sections: dict[str, list[Row]], quick: bool) -> None:
    """Measure SIMON and MPyC and add their columns to fdrtd's rows.

    Args:
        sections: section title -> rows of ``bench/run.py``; rows with a known
            ``key`` (and the "sequential secure sums per second" row) get the
            columns "SIMON", "MPyC" and "ratio"; a section "Reference systems"
            is added.
        quick: the smaller sizes of ``run.py --quick``.
    """
    with tempfile.TemporaryDirectory(prefix="fdrtd-references-") as directory:
        scratch = Path(directory)
        started = time.perf_counter()
        simon = measure_simon(quick, scratch)
        simon_seconds = time.perf_counter() - started
        started = time.perf_counter()
        mpyc, mpyc_rows = measure_mpyc(quick, scratch)
        mpyc_seconds = time.perf_counter() - started

    rows = [row for section in sections.values() for row in section]
    keyed = {row["key"]: row for row in rows if row.get("key") in KEYS}
    rate_rows = [row for row in rows if str(row.get("name", "")).startswith(RATE_ROW)]
    if rate_rows:
        keyed["rate"] = rate_rows[0]
    else:
        keyed["rate"] = {"name": RATE_ROW, "fdrtd": "", "target": ""}
        sections.setdefault("Secure multiparty computation (3 servers)", []).append(keyed["rate"])
    for key, row in keyed.items():
        references = {
            "SIMON": simon.get(key, Cell("not measured")),
            "MPyC": mpyc.get(key, Cell("not measured")),
        }
        for name, cell in references.items():
            row[name] = cell.text
        row["ratio"] = _ratio(_parse(row.get("fdrtd", "")), references, rate=key == "rate")

    sections["Reference systems"] = [
        {
            "name": "versions",
            "SIMON": f"federatedsecure-simon {_version('federatedsecure-simon')}, "
            f"-server {_version('federatedsecure-server')}, "
            f"-client {_version('federatedsecure-client')}",
            "MPyC": f"mpyc {_version('mpyc')}",
        },
        {
            "name": "how it runs",
            "SIMON": f"{PARTIES} server processes (the Bus behind its REST API on "
            "Starlette/uvicorn), one client thread per party; values travel with the call",
            "MPyC": f"a library, not a server: {PARTIES} party processes over TCP; "
            "'in protocol' = parties connected, synchronised round to opened result",
            "ratio": "how many times faster fdrtd is (below 1x: slower)",
        },
        *mpyc_rows,
        {
            "name": "wall time of these reference measurements",
            "SIMON": _format_seconds(simon_seconds),
            "MPyC": _format_seconds(mpyc_seconds),
        },
    ]
