"""What the server lends its own built-in microservices, beyond the plugin SDK.

The built-in ``data`` and ``catalogue`` microservices store uploads and
describe named datasets: they need the server's bus buckets, its upload
limits and its sources read in place, which a plugin never touches. They
import those from here, so that ``microservices`` still imports nothing of
``fdrtd_server`` but :mod:`fdrtd_server.sdk` (checked by ``lint-imports``).
Not part of the plugin facade: these names may change with the server.
"""

from __future__ import annotations

from fdrtd_server.bus import SETS_BUCKET, now_iso, parse_handle
from fdrtd_server.config import DEFAULT_MAX_CLIENT_BYTES, DEFAULT_MAX_PARSE_BYTES
from fdrtd_server.errors import error_for_status
from fdrtd_server.microservice import registration_tag, shown_version
from fdrtd_server.sources import SourceSpec, Version, choose_version, open_source

__all__ = [
    "DEFAULT_MAX_CLIENT_BYTES",
    "DEFAULT_MAX_PARSE_BYTES",
    "SETS_BUCKET",
    "SourceSpec",
    "Version",
    "choose_version",
    "error_for_status",
    "now_iso",
    "open_source",
    "parse_handle",
    "registration_tag",
    "shown_version",
]
