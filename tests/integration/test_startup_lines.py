"""What an operator reads when a server or worker starts: one line, no false alarms.

Real ``fdrtd-server serve`` and ``fdrtd-server worker`` processes on fresh
homes; their output (stderr and stdout together) is read back.
"""

from __future__ import annotations

import re
from pathlib import Path

from _processes import make_server, start_worker_with_new_home, wait_for

from fdrtd_server._embedded_nats import EmbeddedNats
from fdrtd_server.microservice import discover


def problems(text: str) -> list[str]:
    """Lines that would alarm an operator."""
    return [line for line in text.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]


def test_serve_prints_where_it_listens_and_nothing_alarming(tmp_path: Path) -> None:
    server = make_server(tmp_path, "alpha")
    home = server.home
    try:
        server.start()
        port = server.port  # the port it bound (the home says 0: the system chooses)
        server.stop()
    finally:
        server.stop(kill=True)
    text = (home / "server.log").read_text("utf-8", "replace")
    names = ", ".join(sorted(discover()))
    expected = (
        f"fdrtd-server 'alpha' listening on http://127.0.0.1:{port} "
        f"(microservices: {names}; NATS: embedded)"
    )
    assert [line for line in text.splitlines() if "listening on" in line] == [
        line for line in text.splitlines() if line.endswith(expected)
    ]
    assert len([line for line in text.splitlines() if line.endswith(expected)]) == 1, text
    assert problems(text) == [], text


def test_a_worker_prints_what_it_serves_and_nothing_alarming(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    worker, log = start_worker_with_new_home(tmp_path, nats_server, "alpha")
    try:
        wait_for(lambda: "serving" in log.read_text(), "the worker's start line")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert worker.returncode == 0
    text = log.read_text()
    names = ", ".join(sorted(discover()))
    starts = [line for line in text.splitlines() if "fdrtd worker for" in line]
    assert len(starts) == 1, text
    assert f" INFO fdrtd.server: fdrtd worker for 'alpha' serving {names} (NATS: " in starts[0]
    assert "***@127.0.0.1" in starts[0] and nats_server.url not in text  # no password
    assert problems(text) == [], text
