"""Tokens with an expiry, listed without secrets; command-line changes land in the audit log.

Through the real command line and a real running server: admin changes made
with ``fdrtd-server token|grant|source`` while the server writes its own
records keep one hash chain, and ``fdrtd-server audit verify`` passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from _processes import cli, make_server, wait_for

from fdrtd_server.config import TokenStore, expired, init_home, parse_expiry
from fdrtd_server.local import LocalServer


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "h"
    init_home(path, "tok")
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = make_server(tmp_path_factory.mktemp("tokens"), "tok")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(server: LocalServer, token: str, path: str = "/v1/data") -> requests.Response:
    return requests.get(server.url + path, headers={"authorization": f"Bearer {token}"}, timeout=30)


def test_create_with_an_expiry_in_the_past_is_refused(home: Path) -> None:
    past = cli("token", "create", str(home), "ann", "--expires", "2020-01-01T00:00:00Z")
    assert past.returncode == 2 and "not in the future" in past.stderr
    bad = cli("token", "create", str(home), "ann", "--expires", "soon")
    assert bad.returncode == 2 and "30d" in bad.stderr
    assert TokenStore(home).role_of("ann") is None  # nothing was made


def test_expiry_forms() -> None:
    now = datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_expiry("2027-02-01T10:00:00", now) == datetime(2027, 2, 1, 10, tzinfo=UTC)
    assert parse_expiry("2027-02-01T10:00:00+01:00", now).utcoffset() == timedelta(hours=1)


def test_list_shows_names_roles_and_times_never_secrets(home: Path) -> None:
    made = cli("token", "create", str(home), "ann", "--role", "owner", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert cli("token", "add", str(home), "bob").returncode == 0  # the old name still works
    assert cli("token", "revoke", str(home), "bob").returncode == 0
    listed = cli("token", "list", str(home))
    assert listed.returncode == 0, listed.stderr
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    assert set(entries) == {"admin", "ann", "bob"}
    assert entries["ann"]["role"] == "owner" and entries["ann"]["expires"]
    assert entries["ann"]["created"] and "expires" not in entries["admin"]
    assert entries["bob"]["revoked"]
    stored = json.loads((home / "tokens.json").read_text("utf-8"))
    for secret in (token, stored["ann"]["hash"], stored["admin"]["hash"]):
        assert secret not in listed.stdout + listed.stderr
    assert "hash" not in listed.stdout


def test_old_entries_without_times_keep_working(home: Path) -> None:
    store = TokenStore(home)
    token = store.add("legacy")
    entries = json.loads((home / "tokens.json").read_text("utf-8"))
    entries["legacy"] = {"hash": entries["legacy"]["hash"], "role": "analyst"}
    (home / "tokens.json").write_text(json.dumps(entries), "utf-8")
    assert TokenStore(home).authenticate(token) == ("legacy", "analyst")
    assert cli("token", "list", str(home)).returncode == 0


def test_an_expired_token_is_refused_naming_when(running: LocalServer) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    token = TokenStore(running.home).add("brief", expires=expires)
    # the expiry passes while we wait; the server then refuses it
    wait_for(lambda: get(running, token).status_code == 401, "the token to expire")
    answer = get(running, token)
    assert (
        "the token expired at " + expires.isoformat(timespec="seconds") in answer.json()["detail"]
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0d", ("would expire the token at once",)),
        ("0m", ("would expire the token at once",)),
        ("999999w", ("longer than 10 years",)),
        ("999999d", ("longer than 10 years",)),
        ("3651d", ("longer than 10 years",)),
    ],
)
def test_expiry_durations_out_of_range_are_refused(
    home: Path, text: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_expiry(text)
    for word in words:
        assert word in str(caught.value)
    made = cli("token", "create", str(home), "ann", "--expires", text)
    assert made.returncode == 2 and words[0] in made.stderr and "Traceback" not in made.stderr
    assert made.stdout == "" and TokenStore(home).role_of("ann") is None
    now = datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_expiry("3650d", now) == now + timedelta(days=3650)


def test_a_stored_expiry_without_a_zone_is_utc_and_a_broken_one_is_expired() -> None:
    now = datetime(2027, 1, 1, tzinfo=UTC)
    assert not expired("2027-01-01T00:00:01", now)
    assert expired("2026-12-31T23:59:59", now)
    assert not expired("", now)
    for broken in ("soon", "2027-13-01", 5, None, ["2030-01-01"]):
        assert expired(broken, now)


@pytest.mark.parametrize(
    ("stored", "status"),
    [("2999-01-01T00:00:00", 200), ("2000-01-01T00:00:00", 401), ("next week", 401), (7, 401)],
    ids=["naive-future", "naive-past", "unparsable", "number"],
)
def test_a_hand_edited_expiry_never_breaks_a_request(
    running: LocalServer, stored: object, status: int
) -> None:
    name = f"edited-{status}-{abs(hash(str(stored))) % 10_000}"
    token = TokenStore(running.home).add(name)
    path = running.home / "tokens.json"
    entries = json.loads(path.read_text("utf-8"))
    entries[name]["expires"] = stored
    path.write_text(json.dumps(entries), "utf-8")
    answer = get(running, token)
    assert answer.status_code == status, answer.text
    if status == 401:
        assert "expired" in answer.json()["detail"]


def test_revoke_takes_effect_on_the_next_request(running: LocalServer) -> None:
    token = cli("token", "create", str(running.home), "short").stdout.strip()
    assert get(running, token).status_code == 200
    assert cli("token", "revoke", str(running.home), "short").returncode == 0
    assert get(running, token).status_code == 401


def test_a_provider_prefix_is_reserved(home: Path) -> None:
    (home / "keys.json").write_text('{"keys": []}')
    with (home / "fdrtd.toml").open("a", encoding="utf-8") as config:
        config.write(
            '\n[identity]\nissuer = "https://i.example"\naudience = "fdrtd"\n'
            'jwks_file = "keys.json"\nname_prefix = "sso-"\n'
            '[identity.roles]\nanalyst = ["r"]\n'
        )
    taken = cli("token", "create", str(home), "sso-ann")
    assert taken.returncode == 2 and "'sso-'" in taken.stderr


def test_cli_changes_and_server_writes_share_one_verified_chain(
    running: LocalServer, tmp_path: Path
) -> None:
    home = str(running.home)
    owner = cli("token", "create", home, "steward", "--role", "owner").stdout.strip()
    assert cli("token", "create", home, "reader").returncode == 0
    admin = running.admin_token
    csv = tmp_path / "cohort.csv"
    csv.write_text("age\n" + "\n".join(str(30 + i) for i in range(20)) + "\n")
    for step in range(3):
        # the server writes (API requests) between the command line's changes
        assert get(running, owner).status_code == 200
        assert get(running, admin, "/v1/sources").status_code == 200
        name = f"cohort{step}"
        added = cli("source", "add", home, name, "--owner", "steward", "--kind", "csv",
                    "--path", str(csv))  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert get(running, owner, "/v1/catalogue").status_code == 200
        assert cli("grant", "add", home, name, "reader").returncode == 0
        assert cli("grant", "revoke", home, name, "reader").returncode == 0
        assert cli("source", "remove", home, name).returncode == 0
    assert cli("token", "create", home, "reader", "--rotate").returncode == 0
    assert cli("token", "revoke", home, "reader").returncode == 0
    assert get(running, owner).status_code == 200

    records = [json.loads(line) for line in (running.home / "audit.log").read_text().splitlines()]
    changes = [(r["action"], r["target"]) for r in records if r["principal"].startswith("cli:")]
    assert ("token-create", "steward") in changes and ("token-rotate", "reader") in changes
    assert ("token-revoke", "reader") in changes
    assert ("source-add", "cohort2") in changes and ("source-remove", "cohort1") in changes
    assert ("grant", "cohort0") in changes and ("revoke", "cohort0") in changes
    assert owner not in json.dumps(records)
    # everything is anchored by a checkpoint (the CLI's, or the running server's)
    verified = cli("audit", "verify", home)
    assert verified.returncode == 0, verified.stderr
    assert (
        verified.stdout.startswith(f"audit log intact: {len(records)}")
        or "intact" in verified.stdout
    )
    # and the server keeps writing and anchoring after them
    assert get(running, owner).status_code == 200
    wait_for(
        lambda: "not anchored" not in cli("audit", "verify", home).stdout,
        "the running server to anchor its own records",
    )
