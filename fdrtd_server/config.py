"""Server settings and the server's home directory.

A server home holds everything one party's server owns::

    DIR/fdrtd.toml        settings (this module reads and writes it)
    DIR/identity/         the server's signing and key-agreement key pairs
    DIR/tokens.json       client tokens, stored as SHA-256 hashes only
    DIR/federation.toml   the member servers and their public keys
    DIR/jetstream/        embedded NATS JetStream storage (data, results)
    DIR/audit.log         append-only, hash-chained audit log

Settings come from, in order of precedence: command-line options, ``FDRTD_*``
environment variables, then ``fdrtd.toml``. A bad value fails fast with the
key's name and the rule it breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdrtd_server._files import write_atomic

if TYPE_CHECKING:
    from fdrtd_server.oidc import IdentitySettings

__all__ = [
    "CONFIG_FILE",
    "PORT_FILE",
    "Secret",
    "Settings",
    "TokenStore",
    "expired",
    "init_home",
    "load_settings",
    "parse_expiry",
]

CONFIG_FILE = "fdrtd.toml"
TOKENS_FILE = "tokens.json"
PORT_FILE = "port"
"""Where a server started with ``port = 0`` writes the port it bound (``DIR/port``)."""
NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ROLES = ("admin", "owner", "analyst")
"""admin: tokens, sources, policy; owner: publishes datasets and grants their use;
analyst: finds granted datasets and computes on them (see :mod:`fdrtd_server.custody`)."""
DEFAULT_MAX_PARSE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CLIENT_BYTES = 32 * 1024 * 1024 * 1024


class Secret:
    """A string whose ``repr`` never shows its value (tokens, keys)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return self._value


@dataclass(frozen=True)
class Settings:
    """Everything a running server needs to know, checked on construction."""

    home: Path
    name: str
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""
    nats_url: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 8 * 1024 * 1024 * 1024
    max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES
    """Largest csv, json or msgpack upload: those are parsed in memory (raw arrays are not)."""
    max_client_bytes: int = DEFAULT_MAX_CLIENT_BYTES
    """How many bytes of datasets each client (token name) may keep on this server."""
    max_store_bytes: int = 0
    """Bytes all JetStream buckets may hold (0: 8 x max_upload_bytes, at least 1 GiB)."""
    max_read_bytes: int = 2 * 1024 * 1024 * 1024
    """Most bytes of columns a computation may read from a source into memory at once."""
    min_cohort: int = 3
    allow_map_reduce: bool = True
    allow_set_union: bool = False
    allow_set_intersection: bool = False
    allow_matrix_product: bool = False
    allow_vertical_regression: bool = False
    session_timeout: float = 30.0
    nats_reconnect_seconds: float = 60.0
    """How long a lost NATS connection is tried again before the process exits with code 75.

    Long enough for a routine restart of an external NATS (JetStream recovers
    its streams for some seconds). Whatever it says, the embedded
    ``nats-server`` exiting ends the server at once: it cannot come back."""
    microservices: tuple[str, ...] = field(default_factory=tuple)
    plugin_policy: dict[str, dict[str, bool]] = field(default_factory=dict)
    """The microservices' own policy switches as the owner set them, by microservice:
    the ``[policy.<microservice>]`` tables. Checked at start against what each declares."""
    directory: bool = False
    """Whether this server keeps the federation directory (``GET /v1/directory``)."""
    directories: tuple[str, ...] = field(default_factory=tuple)
    """The members that keep a directory: this server registers and heartbeats with each."""
    directory_interval: float = 10.0
    """Seconds between two heartbeats to each directory; silent for 3 of them, a member
    drops out of the listing."""
    identity: IdentitySettings | None = None
    """The institution's identity provider (the ``[identity]`` table), if JWTs are accepted."""
    tls_cert: str = ""
    """The server's TLS certificate chain (PEM): set, the port serves HTTPS itself."""
    tls_key: str = ""
    """The private key of ``tls_cert`` (PEM, unencrypted); empty: it is in that file."""
    tls_ca: str = ""
    """The federation's CA bundle (PEM): peers' certificates must chain to it (only it)."""
    tls_client_cert: str = ""
    """The certificate the peer gateway presents to peers; empty: ``tls_cert``."""
    tls_client_key: str = ""
    """The private key of ``tls_client_cert``; empty: it is in that file."""
    tls_require_client_cert: bool = False
    """Take only clients with a certificate signed by ``tls_ca`` (mutual TLS)."""

    def __post_init__(self) -> None:
        if not NAME_RULE.fullmatch(self.name):
            raise ValueError(
                "setting 'name' must be 1-63 lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError("setting 'port' must be between 0 and 65535")
        for key in (
            "max_body_bytes",
            "max_upload_bytes",
            "max_parse_bytes",
            "max_client_bytes",
            "max_read_bytes",
        ):
            if getattr(self, key) < 1024:
                raise ValueError(f"setting '{key}' must be at least 1024")
        if self.max_store_bytes and self.max_store_bytes < 32 * 1024 * 1024:
            raise ValueError(
                "setting 'max_store_bytes' must be 0 (derived from max_upload_bytes) "
                "or at least 33554432 (32 MiB)"
            )
        if self.min_cohort < 1:
            raise ValueError("setting 'min_cohort' must be at least 1")
        if not 0 < self.session_timeout <= 3600:
            raise ValueError("setting 'session_timeout' must be between 0 and 3600 seconds")
        if not 0 < self.nats_reconnect_seconds <= 3600:
            raise ValueError("setting 'nats_reconnect_seconds' must be between 0 and 3600 seconds")
        for member in self.directories:
            if not isinstance(member, str) or not NAME_RULE.fullmatch(member):
                raise ValueError(
                    "setting 'directories' must list member names (1-63 lowercase letters, "
                    "digits, '-' or '_', starting with a letter or digit)"
                )
        if not 0.05 <= self.directory_interval <= 3600:
            raise ValueError("setting 'directory_interval' must be between 0.05 and 3600 seconds")
        if any(getattr(self, key) for key in _TLS_KEYS):
            from fdrtd_server import tls  # local: only servers that use TLS read its files

            tls.check(self)

    @property
    def url(self) -> str:
        """The URL peers and clients use to reach this server."""
        scheme = "https" if self.tls_cert else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given non-None fields replaced."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


_FIELD_TYPES: dict[str, type] = {
    "name": str,
    "host": str,
    "port": int,
    "public_url": str,
    "nats_url": str,
    "max_body_bytes": int,
    "max_upload_bytes": int,
    "max_parse_bytes": int,
    "max_client_bytes": int,
    "max_store_bytes": int,
    "max_read_bytes": int,
    "min_cohort": int,
    "allow_map_reduce": bool,
    "allow_set_union": bool,
    "allow_set_intersection": bool,
    "allow_matrix_product": bool,
    "allow_vertical_regression": bool,
    "session_timeout": float,
    "nats_reconnect_seconds": float,
    "directory": bool,
    "directories": tuple,
    "directory_interval": float,
    "tls_cert": str,
    "tls_key": str,
    "tls_ca": str,
    "tls_client_cert": str,
    "tls_client_key": str,
    "tls_require_client_cert": bool,
}
_TLS_KEYS = tuple(key for key in _FIELD_TYPES if key.startswith("tls_"))
"""The TLS settings (see :mod:`fdrtd_server.tls`)."""


_POLICY_KEYS = (
    "min_cohort",
    "allow_map_reduce",
    "allow_set_union",
    "allow_set_intersection",
    "allow_matrix_product",
    "allow_vertical_regression",
)
"""The settings of the ``[policy]`` table (besides its ``microservices`` list)."""


def _cast(key: str, value: Any, source: str) -> Any:
    wanted = _FIELD_TYPES[key]
    if wanted is tuple:
        # a TOML list of names, or "a,b" in an environment variable
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{source} '{key}' must be a list of names")
        return tuple(item.strip() for item in items if item.strip())
    if isinstance(value, str) and wanted is not str:
        text = value.strip().lower()
        try:
            if wanted is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return wanted(text)
        except ValueError:
            raise ValueError(f"{source} '{key}' is not a valid {wanted.__name__}") from None
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise ValueError(f"{source} '{key}' must be a {wanted.__name__}")
    return value


def _plugin_switches(path: Path, service: str, table: Mapping[str, Any]) -> dict[str, bool]:
    """The ``[policy.<service>]`` table: switches of a microservice, each true or false.

    Whether the microservice declares them is checked at start, once the
    plugins are loaded (:func:`fdrtd_server.microservice.discover`).
    """
    switches: dict[str, bool] = {}
    for key, value in table.items():
        if not isinstance(value, bool):
            raise ValueError(f"{path}: [policy.{service}] '{key}' must be true or false")
        switches[key] = value
    return switches


def load_settings(
    home: Path, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read ``home/fdrtd.toml``, apply ``FDRTD_*`` variables, then ``overrides``.

    Raises:
        FileNotFoundError: If ``home`` is not an initialised server home.
        ValueError: If a setting is unknown or has a bad value (the key is named).
    """
    path = home / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{home} is not a server home (no {CONFIG_FILE}); run 'fdrtd-server init {home}' first"
        )
    with path.open("rb") as handle:
        try:
            document = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from None
    table = document.get("server", {})
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _FIELD_TYPES:
            raise ValueError(f"{path}: unknown setting '{key}' in [server]")
        values[key] = _cast(key, value, f"{path}: setting")
    if "microservices" in document.get("policy", {}):
        services = document["policy"]["microservices"]
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ValueError(f"{path}: [policy] microservices must be a list of names")
        values["microservices"] = tuple(services)
    for key, value in document.get("policy", {}).items():
        if key in _POLICY_KEYS:
            values[key] = _cast(key, value, f"{path}: setting")
        elif isinstance(value, dict):
            values.setdefault("plugin_policy", {})[key] = _plugin_switches(path, key, value)
        elif key != "microservices":
            raise ValueError(f"{path}: unknown setting '{key}' in [policy]")
    if "identity" in document:
        from fdrtd_server.oidc import IdentitySettings  # local: only servers that use JWTs

        if not isinstance(document["identity"], dict):
            raise ValueError(f"{path}: [identity] must be a table")
        values["identity"] = IdentitySettings.from_table(document["identity"], str(path), home)
    env = os.environ if environ is None else environ
    for key in _FIELD_TYPES:
        variable = "FDRTD_" + key.upper()
        if variable in env:
            values[key] = _cast(key, env[variable], "environment variable")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return Settings(home=home, **values)


def _hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain SHA-256 is a safe verifier.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Client tokens of one server, kept as hashes in ``tokens.json``.

    The file is re-read when it changes, so ``fdrtd-server token create`` takes
    effect on a running server. Every change is made under an exclusive lock
    (``tokens.lock``), so the command line and the running server never lose
    each other's changes.

    A token's name is who owns datasets and results, so a name is never given
    to someone else by accident: :meth:`add` refuses a name that exists, and
    a revoked name stays in the file (without a hash, so that no token
    matches it) to keep it from being reused. Only :meth:`add` with
    ``rotate=True`` gives an existing or revoked name a new secret, on
    purpose, for the same holder.

    Each entry records when it was ``created`` and, optionally, when it
    ``expires``; entries written before those existed have neither and keep
    working. The names of people who came in with a JWT of the institution's
    identity provider are kept here too (``"kind": "oidc"``, no hash), so that
    grants can name them, :meth:`revoke` can shut them out of this server,
    and no local token is ever made under their name.
    """

    def __init__(self, home: Path) -> None:
        self.path = home / TOKENS_FILE
        self._lock_path = home / "tokens.lock"
        self._entries: dict[str, dict[str, str]] = {}
        self._mtime = -1.0

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._entries, self._mtime = {}, -1.0
            return
        if mtime != self._mtime:
            self._entries = json.loads(self.path.read_text("utf-8"))
            self._mtime = mtime

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, str]]]:
        """The entries as on disk, under an exclusive lock; written back if the block ends well."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._mtime = -1.0
            self._reload()
            yield self._entries
            write_atomic(self.path, json.dumps(self._entries, indent=2), mode=0o600)
        finally:
            os.close(fd)  # releases the lock
        self._mtime = -1.0  # read again next time

    def add(
        self,
        name: str,
        role: str | None = None,
        *,
        rotate: bool = False,
        expires: datetime | None = None,
        reserved_prefix: str = "",
    ) -> str:
        """Create a token for ``name`` and return it; only its hash is stored.

        Args:
            name: Who the token is for; datasets and results belong to this name.
            role: ``"analyst"`` (the default for a new name), ``"owner"`` or ``"admin"``; a
                rotated token keeps its role unless one is given.
            rotate: Replace the secret of an existing (or revoked) name: the old
                token stops working at once, and the name keeps what it owns.
            expires: When the token stops working (None: never); must be in the future.
            reserved_prefix: Names that start with it belong to the identity provider
                (its ``name_prefix``) and are refused.

        Raises:
            ValueError: If the name or role breaks the rules, if ``name`` exists
                (or was revoked) and ``rotate`` is not set, if ``rotate`` is
                set and ``name`` does not exist or belongs to the identity
                provider, or if ``expires`` is not in the future.
        """
        if not NAME_RULE.fullmatch(name):
            raise ValueError("token name must be lowercase letters, digits, '-' or '_'")
        if role is not None and role not in ROLES:
            raise ValueError(f"token role must be one of {', '.join(ROLES)}")
        if reserved_prefix and name.startswith(reserved_prefix):
            raise ValueError(
                f"names starting with '{reserved_prefix}' belong to the identity provider's "
                "users ([identity] name_prefix): choose a name without it"
            )
        now = datetime.now(UTC)
        if expires is not None and expires <= now:
            raise ValueError(
                f"the expiry {expires.isoformat(timespec='seconds')} is not in the future"
            )
        token = secrets.token_urlsafe(32)
        with self._editing() as entries:
            existing = entries.get(name)
            if existing is not None and existing.get("kind") == "oidc":
                raise ValueError(
                    f"'{name}' is the name of an identity provider's user on this server; a "
                    "local token cannot take it over"
                )
            if existing is not None and not rotate:
                state = "was revoked" if "hash" not in existing else "exists"
                raise ValueError(
                    f"a token named '{name}' {state}, and the datasets and results of that name "
                    f"belong to it: choose another name for someone new, or use --rotate to give "
                    f"'{name}' a new token (the old one stops working)"
                )
            if existing is None and rotate:
                raise ValueError(
                    f"there is no token named '{name}' to rotate; create it without --rotate"
                )
            entry = {
                "hash": _hash_token(token),
                "role": role or (existing or {}).get("role", "analyst"),
                "created": now.isoformat(timespec="seconds"),
            }
            if expires is not None:
                entry["expires"] = expires.astimezone(UTC).isoformat(timespec="seconds")
            entries[name] = entry
        return token

    def revoke(self, name: str) -> None:
        """Make ``name``'s token invalid at once; the name stays reserved.

        Its datasets and results are kept (the name still owns them) but no
        token reaches them until ``add(name, rotate=True)``. For a name of the
        identity provider, its JWTs are refused on this server from then on.

        Raises:
            ValueError: If there is no token named ``name``, or it is already revoked.
        """
        with self._editing() as entries:
            entry = entries.get(name)
            if entry is None:
                raise ValueError(f"there is no token named '{name}'")
            if "revoked" in entry or ("hash" not in entry and entry.get("kind") != "oidc"):
                raise ValueError(f"the token named '{name}' is already revoked")
            kept = {k: v for k, v in entry.items() if k != "hash"}
            entries[name] = {**kept, "revoked": _now_iso()}

    def role_of(self, name: str) -> str | None:
        """The role of the token name ``name`` (revoked names keep theirs), or None if unknown."""
        self._reload()
        entry = self._entries.get(name)
        return None if entry is None else str(entry.get("role", "analyst"))

    def listing(self) -> list[dict[str, str]]:
        """Every name with its role, kind, creation, expiry and revocation; never a secret."""
        self._reload()
        shown = ("role", "kind", "created", "expires", "revoked")
        return [
            {"name": name, **{k: str(entry[k]) for k in shown if k in entry}}
            for name, entry in sorted(self._entries.items())
        ]

    def match(self, token: str) -> tuple[str, str, str] | None:
        """``(name, role, expires)`` of the entry ``token`` belongs to, expired or not, else None.

        ``expires`` is "" for a token that never expires. Constant-time compare.
        """
        self._reload()
        digest = _hash_token(token)
        found: tuple[str, str, str] | None = None
        for name, entry in self._entries.items():
            # a revoked entry has no hash: compare with a value no digest equals
            if hmac.compare_digest(entry.get("hash", "-" * 64), digest):
                found = (name, entry["role"], entry.get("expires", ""))
        return found

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """Return ``(name, role)`` for a valid, unexpired token, else None."""
        found = self.match(token)
        if found is None or expired(found[2]):
            return None
        return found[0], found[1]

    def external(self, name: str, role: str) -> str:
        """Record a user of the identity provider; "" if they may come in.

        The first visit adds the name (``"kind": "oidc"``), a changed role is
        written down. Returns ``"local"`` if ``name`` is a local token's name,
        ``"revoked"`` if it was revoked on this server.
        """
        self._reload()
        entry = self._entries.get(name)
        if entry is not None and entry.get("kind") != "oidc":
            return "local"
        if entry is not None and "revoked" in entry:
            return "revoked"
        if entry is not None and entry.get("role") == role:
            return ""
        with self._editing() as entries:
            entry = entries.get(name)
            if entry is not None and entry.get("kind") != "oidc":
                return "local"
            if entry is not None and "revoked" in entry:
                return "revoked"
            first = (entry or {}).get("created", _now_iso())
            entries[name] = {"kind": "oidc", "role": role, "created": first}
        return ""


MAX_EXPIRY = timedelta(days=3650)
"""The longest duration ``--expires`` takes (10 years); later is as good as never."""


def expired(expires: object, now: datetime | None = None) -> bool:
    """Whether an ISO 8601 expiry ("" for none) has passed.

    A time without an offset is UTC, as :func:`parse_expiry` reads it. A
    value that is not a time (a hand-edited or damaged ``tokens.json``)
    counts as expired: the token fails closed, never with an error.
    """
    if expires == "":
        return False
    if not isinstance(expires, str):
        return True
    try:
        when = datetime.fromisoformat(expires)
    except ValueError:
        return True
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when <= (now or datetime.now(UTC))


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """An expiry from the command line: ISO 8601 (UTC if no offset) or a duration.

    A duration is a number and a unit: ``30d``, ``12h``, ``45m``, ``2w``; at
    least one unit and at most :data:`MAX_EXPIRY` (10 years).

    Raises:
        ValueError: If it is neither, or a duration out of range, naming the forms that work.
    """
    now = now or datetime.now(UTC)
    duration = re.fullmatch(r"(\d{1,6})([mhdw])", text.strip())
    if duration:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[duration.group(2)]
        if int(duration.group(1)) == 0:
            raise ValueError(
                f"--expires {text.strip()} would expire the token at once: give a duration of "
                "at least 1 (e.g. 30d), or leave --expires out for a token that does not expire"
            )
        try:
            length = timedelta(**{unit: int(duration.group(1))})
        except OverflowError:
            length = MAX_EXPIRY + timedelta(days=1)
        if length > MAX_EXPIRY:
            raise ValueError(
                f"--expires {text.strip()} is longer than 10 years (3650d, 521w), the longest "
                "expiry a token takes; leave --expires out for a token that does not expire"
            )
        return now + length
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            "--expires must be an ISO 8601 time (2027-01-31T18:00:00+01:00; UTC without an "
            "offset) or a duration such as 30d, 12h, 45m or 2w"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def init_home(home: Path, name: str, *, port: int = 8000, host: str = "127.0.0.1") -> str:
    """Create a server home and return the first admin token (shown once).

    Raises:
        FileExistsError: If ``home`` already holds a server.
    """
    from fdrtd_server.identity import Identity  # local: keeps `import config` light

    if (home / CONFIG_FILE).exists():
        raise FileExistsError(f"{home} already holds a server ({CONFIG_FILE} exists)")
    settings = Settings(home=home, name=name, port=port, host=host)  # validates
    home.mkdir(parents=True, exist_ok=True)
    (home / "jetstream").mkdir(exist_ok=True)
    (home / CONFIG_FILE).write_text(
        "# fdrtd server settings; see docs/deployment.md\n"
        "[server]\n"
        f'name = "{settings.name}"\n'
        f'host = "{settings.host}"\n'
        f"port = {settings.port}\n"
        '# public_url = "https://fdrtd.example.org"\n'
        "# serve HTTPS; peers must have certificates of the federation's CA (PEM files)\n"
        '# tls_cert = "tls/server.pem"\n# tls_key = "tls/server.key"\n# tls_ca = "tls/ca.pem"\n'
        '# nats_url = "nats://127.0.0.1:4222"   # default: an embedded nats-server\n'
        "# csv, json and msgpack uploads are parsed in memory; raw arrays are not\n"
        f"# max_parse_bytes = {settings.max_parse_bytes}\n"
        "# bytes of datasets each client (token name) may keep here\n"
        f"# max_client_bytes = {settings.max_client_bytes}\n"
        "# all datasets and results; 0: 8 x max_upload_bytes, at least 1 GiB\n"
        "# max_store_bytes = 0\n"
        "\n[policy]\n"
        f"min_cohort = {settings.min_cohort}\n"
        "allow_map_reduce = true\n"
        "# a set union discloses every item of every party (not who holds it)\n"
        "allow_set_union = false\n"
        "# a set intersection discloses the items that every party holds\n"
        "allow_set_intersection = false\n"
        "# a matrix product can disclose a whole input (B = I reveals A)\n"
        "allow_matrix_product = false\n"
        "# vertical OLS opens X'X: a crafted column can read another party's values\n"
        "allow_vertical_regression = false\n",
        "utf-8",
    )
    Identity.generate(name).save(home / "identity")
    return TokenStore(home).add("admin", "admin")
