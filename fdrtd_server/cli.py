"""The ``fdrtd-server`` command line.

::

    fdrtd-server init DIR [--name NAME] [--port PORT]   create a server home
    fdrtd-server serve DIR [--nats-url URL] [--port PORT] [--no-local-microservices]
                       [--tls-cert FILE --tls-key FILE]   serve HTTPS (see docs/deployment.md)
    fdrtd-server worker [--nats-url URL|file:PATH] --home DIR   microservices only, DIR's policy
    fdrtd-server demo                                   three parties, one joint result
    fdrtd-server token create DIR NAME [--role analyst|owner|admin] [--rotate]
                        [--expires ISO8601|30d|12h]     create a token (or replace NAME's);
                                                        'token add' is the same command
    fdrtd-server token list DIR                         names, roles, creation, expiry (no secrets)
    fdrtd-server token revoke DIR NAME                  make NAME's token invalid
    fdrtd-server grant add DIR DATASET GRANTEE [--functions F,...] [--not-before T] [--not-after T]
    fdrtd-server grant list DIR [DATASET]               who may use which dataset
    fdrtd-server grant revoke DIR DATASET GRANTEE       applies to the grantee's next request
    fdrtd-server source add DIR NAME --owner OWNER --kind KIND [--path P] [--table T] [--query Q]
                        [--dsn-env VAR] [--order-by C] [--hold-back N] [--description TEXT]
    fdrtd-server source list DIR                        registered sources (no secrets)
    fdrtd-server source remove DIR NAME                 and its grants
    fdrtd-server federation show DIR [--url URL]        print this server's public entry
    fdrtd-server federation add DIR FILE                add a peer's entry (FILE or -)
    fdrtd-server audit verify DIR [--key B64] [--checkpoint FILE]...
                                                        check the audit log and its checkpoint
    fdrtd-server audit checkpoint DIR                   sign a checkpoint of the audit log now
    fdrtd-server policy check FILE                      check a policy file before it is used
    fdrtd-server policy show DIR                        the owner's policy in force in DIR
    fdrtd-server receipt verify FILE [--federation FILE | --home DIR]
                                                        check a result's receipt offline
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import logging
import os
import pwd
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fdrtd_server import config
from fdrtd_server.identity import Identity, PeerEntry, add_member

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdrtd-server", description="fdrtd: federated secure computing server"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create a server home")
    init.add_argument("home", type=Path)
    init.add_argument("--name", help="server name (default: the directory's name)")
    init.add_argument("--port", type=int, default=8000)
    init.add_argument("--host", default="127.0.0.1")

    serve = commands.add_parser("serve", help="run the API controller (and microservices)")
    serve.add_argument("home", type=Path)
    serve.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM; tls_cert)"
    )
    serve.add_argument(
        "--tls-key", type=Path, help="the private key of --tls-cert (PEM, unencrypted; tls_key)"
    )
    serve.add_argument(
        "--no-local-microservices",
        action="store_true",
        help="run no microservices in this process (workers provide them)",
    )

    worker = commands.add_parser("worker", help="run microservices only, against an existing NATS")
    worker.add_argument(
        "--nats-url",
        help="the NATS URL, or file:PATH to read it (with credentials) from a mode-0600 file; "
        "default: the home's nats_url setting, else the embedded NATS of the server running "
        "in --home (file:HOME/jetstream/nats-client.url). A password on the command line is "
        "visible to every local user (ps): use file:PATH",
    )
    worker.add_argument(
        "--home",
        type=Path,
        help="the server home whose settings and policy the microservices follow (required: "
        "a worker without it would run every microservice with default settings)",
    )

    demo = commands.add_parser("demo", help="three servers on this machine compute a joint result")
    demo.add_argument("--rows", type=int, default=5000, help="records per party")
    demo.add_argument("--keep", type=Path, help="keep the server homes in this directory")

    token = commands.add_parser("token", help="manage client tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_add = token_commands.add_parser(
        "create", aliases=["add"], help="create a token (printed once)"
    )
    token_add.add_argument("home", type=Path)
    token_add.add_argument("name")
    token_add.add_argument(
        "--role", choices=config.ROLES, help="default: analyst (a rotated token keeps its role)"
    )
    token_add.add_argument(
        "--rotate",
        action="store_true",
        help="give an existing (or revoked) NAME a new token; the old one stops working and "
        "NAME keeps its datasets and results",
    )
    token_add.add_argument(
        "--expires",
        help="when the token stops working: an ISO 8601 time (UTC without an offset) or a "
        "duration such as 30d, 12h, 45m, 2w (default: never)",
    )
    token_list = token_commands.add_parser(
        "list", help="print names, roles, creation, expiry and revocation (never secrets)"
    )
    token_list.add_argument("home", type=Path)
    token_revoke = token_commands.add_parser(
        "revoke", help="make a token invalid now (its name stays reserved)"
    )
    token_revoke.add_argument("home", type=Path)
    token_revoke.add_argument("name")

    grant = commands.add_parser("grant", help="grant analysts the use of named datasets")
    grant_commands = grant.add_subparsers(dest="grant_command", required=True)
    grant_add = grant_commands.add_parser("add", help="let GRANTEE use DATASET")
    grant_add.add_argument("home", type=Path)
    grant_add.add_argument("dataset")
    grant_add.add_argument("grantee", help="the token name of the analyst")
    grant_add.add_argument(
        "--functions", default="", help="only these, e.g. 'smpc.univariate,map.*' (default: all)"
    )
    grant_add.add_argument("--not-before", help="ISO 8601 time the grant starts")
    grant_add.add_argument("--not-after", help="ISO 8601 time the grant ends")
    grant_list = grant_commands.add_parser("list", help="print the grants")
    grant_list.add_argument("home", type=Path)
    grant_list.add_argument("dataset", nargs="?")
    grant_revoke = grant_commands.add_parser("revoke", help="revoke a grant")
    grant_revoke.add_argument("home", type=Path)
    grant_revoke.add_argument("dataset")
    grant_revoke.add_argument("grantee")

    source = commands.add_parser("source", help="register data read in place")
    source_commands = source.add_subparsers(dest="source_command", required=True)
    source_add = source_commands.add_parser("add", help="register a file, directory or database")
    source_add.add_argument("home", type=Path)
    source_add.add_argument("name", help="the dataset's name in the catalogue")
    source_add.add_argument("--owner", required=True, help="the token name of its owner")
    source_add.add_argument(
        "--kind", required=True, choices=("csv", "parquet", "sqlite", "postgresql")
    )
    source_add.add_argument("--path", default="", help="a file or directory (csv, parquet, sqlite)")
    source_add.add_argument("--table", default="", help="a table (sqlite, postgresql)")
    source_add.add_argument("--query", default="", help="a fixed SELECT (sqlite, postgresql)")
    source_add.add_argument(
        "--dsn-env", default="", help="the environment variable holding the connection string"
    )
    source_add.add_argument("--order-by", default="", help="the column giving the row order")
    source_add.add_argument(
        "--hold-back", type=int, default=0, help="release new rows only N at a time (FedMed)"
    )
    source_add.add_argument("--description", default="")
    source_list = source_commands.add_parser("list", help="print the registered sources")
    source_list.add_argument("home", type=Path)
    source_remove = source_commands.add_parser("remove", help="remove a source and its grants")
    source_remove.add_argument("home", type=Path)
    source_remove.add_argument("name")

    federation = commands.add_parser("federation", help="manage the federation file")
    fed_commands = federation.add_subparsers(dest="federation_command", required=True)
    show = fed_commands.add_parser("show", help="print this server's public entry as TOML")
    show.add_argument("home", type=Path)
    show.add_argument("--url", help="the URL peers reach this server at")
    add = fed_commands.add_parser("add", help="add a peer's public entry")
    add.add_argument("home", type=Path)
    add.add_argument("file", help="a file holding the peer's entry, or - for stdin")

    audit = commands.add_parser("audit", help="audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain and the signed checkpoint that anchors it"
    )
    verify.add_argument("home", type=Path)
    verify.add_argument(
        "--key",
        help="the server's Ed25519 public key (base64, the sign_key its peers hold); "
        "default: the key in DIR/identity",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint kept elsewhere (from 'audit checkpoint'); the log must match it too",
    )
    point = audit_commands.add_parser(
        "checkpoint",
        help="verify, then sign a checkpoint of the audit log now and print it "
        "(keep a copy elsewhere)",
    )
    point.add_argument("home", type=Path)

    policy = commands.add_parser("policy", help="the owner's policy per dataset (policy.toml)")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser(
        "check", help="check a policy file; exit 2 naming FILE:LINE of the first broken rule"
    )
    check.add_argument("file", type=Path)
    policy_show = policy_commands.add_parser("show", help="print the policy in force in DIR")
    policy_show.add_argument("home", type=Path)

    receipt = commands.add_parser("receipt", help="result receipts")
    receipt_commands = receipt.add_subparsers(dest="receipt_command", required=True)
    check = receipt_commands.add_parser(
        "verify", help="check a saved receipt: every signature, and that the parties agree"
    )
    check.add_argument("file", type=Path, help="the receipt (JSON, as the client saves it)")
    keys = check.add_mutually_exclusive_group(required=True)
    keys.add_argument("--federation", type=Path, help="a federation file listing every party")
    keys.add_argument(
        "--home", type=Path, help="a server home: its federation file and its own identity"
    )
    return parser


def _entry_toml(entry: PeerEntry) -> str:
    fields = entry.to_dict()
    lines = ["[[member]]", *(f'{key} = "{value}"' for key, value in fields.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "worker" and args.home is None:
        # checked here rather than with required=True, to say why
        print(
            "fdrtd-server worker: error: --home DIR is required: the server home whose "
            "settings and policy (enabled microservices, minimum cohort, allowed functions) "
            "the worker's microservices follow",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # the one line a start prints (where it listens, what it serves) is news, not a warning
    logging.getLogger("fdrtd.server").setLevel(logging.INFO)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError) as error:
        print(f"fdrtd-server: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def home_path(text: str) -> Path:
    """A server home directory from the command line."""
    return Path(text).expanduser().resolve()


def _audit(args: argparse.Namespace) -> int:
    """``audit verify`` and ``audit checkpoint``."""
    import json

    from fdrtd_server import audit

    home = home_path(str(args.home))
    settings = config.load_settings(home)
    log = home / "audit.log"
    identity: Identity | None = None
    try:
        identity = Identity.load(home / "identity", settings.name)
    except FileNotFoundError:
        if args.audit_command == "checkpoint" or not args.key:
            raise FileNotFoundError(
                f"{home / 'identity'} holds no identity key: give the server's public key "
                "with --key to verify its checkpoints"
            ) from None
    if args.audit_command == "checkpoint":
        assert identity is not None
        if not log.is_file():
            raise FileNotFoundError(f"{log} does not exist: nothing was audited on this server yet")
        verified, point = audit.checkpoint_now(log, identity)
        print("\n".join(verified.lines()), file=sys.stderr)
        print(json.dumps(point.to_dict(), indent=2))
        return 0
    key = identity.sign_public if identity is not None else None
    if args.key:
        try:
            key = base64.b64decode(args.key, validate=True)
        except binascii.Error:
            raise ValueError(
                "--key must be base64 (the sign_key of the federation entry)"
            ) from None
        if len(key) != 32:
            raise ValueError("--key must be a 32-byte Ed25519 public key in base64")
        if identity is not None and identity.sign_public != key:
            raise ValueError(
                f"--key {key.hex()[:16]} is not the key of the identity in {home / 'identity'} "
                f"({identity.sign_public.hex()[:16]}): the identity was replaced"
            )
    verified = audit.verify_anchored(
        log, public_key=key, server=settings.name, extra=tuple(args.checkpoint)
    )
    print("\n".join(verified.lines()))
    return 0


def _policy(args: argparse.Namespace) -> int:
    """``policy check FILE`` and ``policy show DIR``."""
    import json

    from fdrtd_server.policy import POLICY_FILE, Policy, PolicyError

    if args.policy_command == "check":
        path = Path(args.file)
        try:
            policy = Policy.read(path)
        except FileNotFoundError:
            print(f"{path}: no such file", file=sys.stderr)
            return 2
        except PolicyError as error:
            print(error, file=sys.stderr)
            return 2
        print(f"version {policy.version}")
        print(f"defaults: {policy.defaults.summary()}")
        for name, dataset in sorted(policy.datasets.items()):
            print(f"{name}: {dataset.summary()}")
        return 0
    home = home_path(str(args.home))
    config.load_settings(home)  # refuse directories that are not server homes
    path = home / POLICY_FILE
    try:
        policy = Policy.read(path) if path.exists() else Policy()
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    shown = {
        "version": policy.version,
        "file": str(path) if path.exists() else None,
        "defaults": policy.defaults.to_dict(),
        "datasets": {name: p.to_dict() for name, p in sorted(policy.datasets.items())},
    }
    print(json.dumps(shown, indent=2))
    return 0


def _receipt(args: argparse.Namespace) -> int:
    """``receipt verify``: exit 0 with a summary line, 1 naming the check that failed."""
    from fdrtd_client.errors import ReceiptError
    from fdrtd_server.receipts import verify_file

    home = None if args.home is None else home_path(str(args.home))
    try:
        print(verify_file(args.file, federation=args.federation, home=home))
    except ReceiptError as error:
        print(f"fdrtd-server: {args.file}: {error}", file=sys.stderr)
        return 1
    return 0


def _actor() -> str:
    """Who makes a change from the command line, as the audit log names them.

    The account of the process's user id, not ``$USER`` or ``$LOGNAME``
    (which anyone sets to any name); ``uid-N`` if the id has no account.
    """
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # no account for this uid (a bare container)
        name = f"uid-{uid}"
    return f"cli:{name}"[:64]


@contextlib.contextmanager
def _audited(home: Path, action: str, target: str) -> Iterator[dict[str, Any]]:
    """Make a change in the ``with`` block only if its audit record can be written.

    See :func:`fdrtd_server.audit.admin_change`; the record names the user
    and their numeric uid. A broken audit log stops the command (exit 2)
    before anything is changed.
    """
    from fdrtd_server.audit import AuditError, admin_change

    try:
        with admin_change(home, _actor(), action, target) as record:
            record["uid"] = os.getuid()
            yield record
    except AuditError as error:
        raise ValueError(
            f"{error}. Nothing was changed: changes are made only when they can be "
            f"audited; see 'fdrtd-server audit verify {home}'"
        ) from None


def _tokens(args: argparse.Namespace) -> int:
    """``token create|add|list|revoke``; every change is audited."""
    import json

    home = home_path(str(args.home))
    settings = config.load_settings(home)  # refuse directories that are not server homes
    store = config.TokenStore(home)
    if args.token_command == "list":
        print(json.dumps(store.listing(), indent=2))
        return 0
    if args.token_command == "revoke":
        with _audited(home, "token-revoke", args.name):
            store.revoke(args.name)
        print(f"revoked the token of '{args.name}'; the name stays reserved", file=sys.stderr)
        return 0
    expires = config.parse_expiry(args.expires) if args.expires else None
    prefix = settings.identity.name_prefix if settings.identity is not None else ""
    with _audited(home, "token-rotate" if args.rotate else "token-create", args.name) as record:
        token = store.add(
            args.name, args.role, rotate=args.rotate, expires=expires, reserved_prefix=prefix
        )
        record["role"] = store.role_of(args.name) or ""
        record["expires"] = expires.isoformat(timespec="seconds") if expires else ""
    print(token)
    return 0


def _custody(args: argparse.Namespace) -> int:
    """``grant add|list|revoke`` and ``source add|list|remove``."""
    import json

    from fdrtd_server.custody import CustodyStore, Grant

    home = home_path(str(args.home))
    config.load_settings(home)  # refuse directories that are not server homes
    store = CustodyStore(home)
    tokens = config.TokenStore(home)
    try:
        if args.command == "grant":
            if args.grant_command == "add":
                if tokens.role_of(args.grantee) not in ("analyst", "owner"):
                    raise ValueError(
                        f"'{args.grantee}' is not the token name of an analyst or owner of "
                        "this server: create the token first (fdrtd-server token add)"
                    )
                grant = Grant.make(
                    args.dataset,
                    args.grantee,
                    args.functions,
                    args.not_before,
                    args.not_after,
                    "(command line)",
                )
                with _audited(home, "grant", grant.dataset) as record:
                    grant = store.grant(grant)
                    record.update(
                        grantee=grant.grantee,
                        functions=",".join(grant.functions) or "*",
                        not_before=grant.not_before or "",
                        not_after=grant.not_after or "",
                    )
                print(f"granted '{grant.grantee}' the use of '{grant.dataset}'", file=sys.stderr)
            elif args.grant_command == "revoke":
                with _audited(home, "revoke", args.dataset) as record:
                    store.revoke(args.dataset, args.grantee)
                    record["grantee"] = args.grantee
                print(f"revoked the grant of '{args.dataset}' to '{args.grantee}'", file=sys.stderr)
            else:
                grants = [
                    g.to_dict()
                    for g in store.grants()
                    if args.dataset is None or g.dataset == args.dataset
                ]
                print(json.dumps(grants, indent=2))
            return 0
        if args.source_command == "add":
            if tokens.role_of(args.owner) != "owner":
                raise ValueError(
                    f"'{args.owner}' is not the token name of an owner of this server "
                    f"(fdrtd-server token add {home} {args.owner} --role owner)"
                )
            spec = {
                key: value
                for key, value in {
                    "kind": args.kind,
                    "path": args.path,
                    "table": args.table,
                    "query": args.query,
                    "dsn_env": args.dsn_env,
                    "order_by": args.order_by,
                    "hold_back": args.hold_back,
                }.items()
                if value not in ("", 0)
            }
            with _audited(home, "source-add", args.name) as record:
                entry = store.add_source(args.name, args.owner, spec, args.description)
                record.update(kind=entry.kind, owner=entry.owner)
            print(f"registered the {entry.kind} source '{entry.name}' of '{entry.owner}'")
        elif args.source_command == "remove":
            with _audited(home, "source-remove", args.name):
                store.remove(args.name)
            print(f"removed the source '{args.name}' and its grants", file=sys.stderr)
        else:
            sources = {
                name: {"owner": e.owner, "kind": e.kind, "configured": e.configured}
                for name, e in store.datasets().items()
                if e.kind != "upload"
            }
            print(json.dumps(sources, indent=2))
        return 0
    except KeyError as error:
        raise ValueError(str(error.args[0])) from None
    except FileExistsError as error:
        raise ValueError(str(error)) from None


def _run(args: argparse.Namespace) -> int:
    if args.command in ("serve", "worker"):
        # uvicorn, starlette and nats load only for the commands that need them
        from fdrtd_server.server import environment, run_worker, serve

    if args.command == "init":
        home = home_path(str(args.home))
        name = args.name or home.name.lower()
        token = config.init_home(home, name, port=args.port, host=args.host)
        from fdrtd_server.policy import write_template

        write_template(home)  # the built-in defaults, commented, for the owner to change
        print(f"created server '{name}' in {home}")
        print(f"admin token (shown once, store it safely): {token}")
        return 0
    if args.command == "serve":
        settings = config.load_settings(
            home_path(str(args.home)),
            {
                "nats_url": args.nats_url,
                "host": args.host,
                "port": args.port,
                **{
                    key: str(path.expanduser().resolve())
                    for key, path in (("tls_cert", args.tls_cert), ("tls_key", args.tls_key))
                    if path is not None
                },
            },
        )
        return serve(settings, local_microservices=not args.no_local_microservices)
    if args.command == "worker":
        from fdrtd_server.bus import StoreLimits

        home = home_path(str(args.home))
        settings = config.load_settings(home)
        url = args.nats_url or settings.nats_url or f"file:{home / 'jetstream' / 'nats-client.url'}"
        return run_worker(
            url,
            environment(settings),
            settings.microservices,
            limits=StoreLimits.from_settings(settings),
            reconnect_seconds=settings.nats_reconnect_seconds,
        )
    if args.command == "demo":
        from fdrtd_server.demo import run_demo

        return run_demo(rows=args.rows, keep=args.keep)
    if args.command == "token":
        return _tokens(args)
    if args.command in ("grant", "source"):
        return _custody(args)
    if args.command == "federation":
        home = home_path(str(args.home))
        settings = config.load_settings(home)
        if args.federation_command == "show":
            identity = Identity.load(home / "identity", settings.name)
            print(_entry_toml(identity.public_entry(args.url or settings.url)), end="")
            return 0
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        members = tomllib.loads(text).get("member", [])
        if not members:
            raise ValueError("the file holds no [[member]] entry")
        for member in members:
            entry = PeerEntry.from_dict(member)
            if entry.name == settings.name:
                raise ValueError("a server cannot add itself to its own federation")
            add_member(home / "federation.toml", entry)
            print(f"added '{entry.name}' ({entry.url})")
            from fdrtd_server.tls import plain_members

            for warning in plain_members(settings, {entry.name: entry.url}):
                print(f"fdrtd-server: warning: {warning}", file=sys.stderr)
        return 0
    if args.command == "audit":
        return _audit(args)
    if args.command == "policy":
        return _policy(args)
    if args.command == "receipt":
        return _receipt(args)
    raise AssertionError(args.command)  # argparse makes this unreachable
