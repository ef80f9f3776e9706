"""Several processes append to one audit log: each record chains to whoever wrote last."""

from __future__ import annotations

import threading
from pathlib import Path

from fdrtd_server.audit import AuditLog, verify, verify_anchored
from fdrtd_server.identity import Identity

SERVER = Identity.generate("alpha")


def test_interleaved_writers_keep_one_chain_and_the_server_anchors_them(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    other = AuditLog(path)  # what a command-line change opens
    for i in range(5):
        server.write("ann", "list", "data", n=i)
        other.write("cli:root", "grant", f"set{i}")
    assert verify(path) == 10
    point = server.checkpoint()  # covers what the other writer appended
    assert point is not None and point.count == 10
    assert verify_anchored(path, public_key=SERVER.sign_public).after_checkpoint == 0
    server.close()


def test_concurrent_writers_in_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    logs = [AuditLog(path) for _ in range(4)]

    def hammer(log: AuditLog, who: int) -> None:
        for i in range(50):
            log.write(f"w{who}", "noop", str(i))

    threads = [threading.Thread(target=hammer, args=(log, n)) for n, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify(path) == 200


def test_a_forged_append_by_another_process_stops_the_servers_checkpoints(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    server = AuditLog(path, SERVER, delay=3600)
    server.write("ann", "list", "data")
    server.checkpoint()
    with path.open("ab") as handle:  # not a record that continues the chain
        handle.write(b'{"action":"forged","hash":"00","prev":"00"}\n')
    server.write("ann", "list", "data")  # the request is still answered
    assert server.checkpoint() is None  # but the server signs nothing over the break
    server.close()
