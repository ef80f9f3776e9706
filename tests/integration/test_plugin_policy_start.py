"""A switch the owner sets that no microservice declares stops ``fdrtd-server serve`` at start.

Not a 500 on the first request that reads it: the real command exits with
code 2 and one line naming the table, the switch and the switches declared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fdrtd_server.config import CONFIG_FILE, init_home


def test_an_undeclared_switch_in_fdrtd_toml_stops_the_start(tmp_path: Path) -> None:
    home = tmp_path / "alpha"
    init_home(home, "alpha", port=0)
    with (home / CONFIG_FILE).open("a", encoding="utf-8") as config:
        config.write("\n[policy.smpc]\nallow_everything = true\n")
    done = subprocess.run(
        [sys.executable, "-m", "fdrtd_server", "serve", str(home)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "[policy.smpc] sets 'allow_everything'" in done.stderr
    assert "does not declare (its switches: none)" in done.stderr
    assert "Traceback" not in done.stderr
