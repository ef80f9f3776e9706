"""Lets these tests run from a checkout in which the plugin is not installed.

Installed (``pip install -e examples/vector_mean``), the package is found as
it is; otherwise its source directory is put on the path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("vector_mean") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
