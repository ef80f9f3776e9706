"""Identities, peer entries and the federation file."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fdrtd_server.identity import (
    IDENTITY_FILENAME,
    FederationFileError,
    Identity,
    PeerEntry,
    _toml_string,
    add_member,
    load_federation,
    save_federation,
)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def entry(name: str, url: str | None = None) -> PeerEntry:
    return Identity.generate(name).public_entry(url or f"https://{name}.example:8443")


# --- PeerEntry -----------------------------------------------------------------------


def test_peer_entry_dict_round_trip() -> None:
    original = entry("hospital-a")
    data = original.to_dict()
    assert set(data) == {"name", "url", "sign_key", "box_key"}
    assert base64.b64decode(data["sign_key"]) == original.sign_public
    assert base64.b64decode(data["box_key"]) == original.box_public
    assert PeerEntry.from_dict(data) == original


@pytest.mark.parametrize(
    "name",
    ["a", "a" * 63, "lab_1", "0-x", "hospital-a"],
)
def test_valid_names(name: str) -> None:
    data = entry("x").to_dict() | {"name": name}
    assert PeerEntry.from_dict(data).name == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Hospital", "-a", "_a", "a" * 64, "a b", "a.b", "a/b", "ä", "a\n", 7, None],
)
def test_invalid_names(name: object) -> None:
    data: dict[str, object] = {**entry("x").to_dict(), "name": name}
    with pytest.raises(ValueError, match="`name`") as info:
        PeerEntry.from_dict(data)
    assert "^[a-z0-9][a-z0-9_-]{0,62}$" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host",
        "https://",
        "http:///path",
        "host:8443",
        "https://host name",
        'https://host"x',
        "https://h\u00f6st",
        "https://host:99999",
        "https://host/\n",
        "https://" + "h" * 3000,
        42,
    ],
)
def test_invalid_urls(url: object) -> None:
    data: dict[str, object] = {**entry("x").to_dict(), "url": url}
    with pytest.raises(ValueError, match="`url`") as info:
        PeerEntry.from_dict(data)
    # The message names the rule, never the value (a long value is not echoed).
    assert "h" * 100 not in str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8001", "https://fdrtd.lab.example/peer", "http://[::1]:80"]
)
def test_valid_urls(url: str) -> None:
    assert entry("x", url).url == url


@pytest.mark.parametrize("field", ["sign_key", "box_key"])
@pytest.mark.parametrize(
    "value",
    [
        b64(b"\x01" * 31),
        b64(b"\x01" * 33),
        "not base64 at all, but 44 characters long!!",
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
        b64(b"\x01" * 32).rstrip("="),
        "A" * 10_000,
        b"\x01" * 32,
        None,
    ],
)
def test_invalid_keys(field: str, value: object) -> None:
    data: dict[str, object] = {**entry("x").to_dict(), field: value}
    with pytest.raises(ValueError, match=f"`{field}`.*base64.*32 bytes") as info:
        PeerEntry.from_dict(data)
    assert "AAAAAAAAAA" not in str(info.value)


def test_missing_and_unknown_fields() -> None:
    data = entry("x").to_dict()
    del data["box_key"]
    with pytest.raises(ValueError, match=r"missing field.*box_key"):
        PeerEntry.from_dict(data)
    with pytest.raises(ValueError, match=r"unknown field.*colour"):
        PeerEntry.from_dict({**entry("x").to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="mapping"):
        PeerEntry.from_dict(["name"])  # type: ignore[arg-type]


def test_peer_entry_constructor_validates() -> None:
    good = entry("x")
    with pytest.raises(ValueError, match="`sign_public`"):
        PeerEntry("x", good.url, b"short", good.box_public)
    with pytest.raises(ValueError, match="`box_public`"):
        PeerEntry("x", good.url, good.sign_public, "a" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`name`"):
        PeerEntry("X", good.url, good.sign_public, good.box_public)


# --- Identity ------------------------------------------------------------------------


def test_generate_gives_distinct_keys() -> None:
    one, two = Identity.generate("a"), Identity.generate("a")
    assert one.sign_public != two.sign_public
    assert one.box_public != two.box_public
    assert len(one.sign_public) == len(one.box_public) == 32


def test_invalid_identity_name() -> None:
    with pytest.raises(ValueError, match="`name`"):
        Identity.generate("Not Valid")


def test_sign_and_exchange() -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    signature = alice.sign(b"hello")
    Ed25519PublicKey.from_public_bytes(alice.sign_public).verify(signature, b"hello")
    assert alice.exchange(bob.box_public) == bob.exchange(alice.box_public)


def test_public_entry() -> None:
    alice = Identity.generate("alice")
    pub = alice.public_entry("https://alice.example")
    assert (pub.name, pub.url) == ("alice", "https://alice.example")
    assert (pub.sign_public, pub.box_public) == (alice.sign_public, alice.box_public)
    with pytest.raises(ValueError, match="`url`"):
        alice.public_entry("alice.example")


def test_save_load_round_trip(tmp_path: Path) -> None:
    original = Identity.generate("lab-7")
    directory = tmp_path / "data" / "keys"
    path = original.save(directory)
    assert path == directory / IDENTITY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
    # No temporary file is left behind.
    assert [p.name for p in directory.iterdir()] == [IDENTITY_FILENAME]

    loaded = Identity.load(directory, "lab-7")
    assert loaded.name == "lab-7"
    assert loaded.sign_public == original.sign_public
    assert loaded.box_public == original.box_public
    # The loaded private keys work: a signature verifies, the secret agrees.
    Ed25519PublicKey.from_public_bytes(original.sign_public).verify(loaded.sign(b"m"), b"m")
    peer = Identity.generate("peer")
    assert loaded.exchange(peer.box_public) == original.exchange(peer.box_public)
    text = path.read_text()
    assert text.startswith('# fdrtd identity "lab-7"')
    assert text.count("-----BEGIN PRIVATE KEY-----") == 2


def test_save_overwrites_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILENAME
    path.write_text("old")
    os.chmod(path, 0o644)
    Identity.generate("a").save(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(tmp_path, "a").name == "a"


def test_load_refuses_readable_file(tmp_path: Path) -> None:
    path = Identity.generate("a").save(tmp_path)
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        Identity.load(tmp_path, "a")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path, "a")


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    path = Identity.generate("a").save(tmp_path)
    text = path.read_text()
    blocks = text.split("-----END PRIVATE KEY-----\n")

    def write(content: str) -> None:
        path.write_text(content)
        os.chmod(path, 0o600)

    write(blocks[0] + "-----END PRIVATE KEY-----\n")  # only the Ed25519 key
    with pytest.raises(ValueError, match="exactly one Ed25519 and one X25519"):
        Identity.load(tmp_path, "a")
    write("garbage")
    with pytest.raises(ValueError, match="exactly one"):
        Identity.load(tmp_path, "a")
    write("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not a readable"):
        Identity.load(tmp_path, "a")
    # Two X25519 keys, no Ed25519 key.
    other = Identity.generate("a").save(tmp_path / "other").read_text()
    x_block = other.split("-----END PRIVATE KEY-----\n")[1]
    write(x_block + "-----END PRIVATE KEY-----\n" + x_block + "-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match=r"found 0 and 2"):
        Identity.load(tmp_path, "a")


def test_load_accepts_keys_in_any_order(tmp_path: Path) -> None:
    original = Identity.generate("a")
    path = original.save(tmp_path)
    _header, ed_block, x_block = path.read_text().split("-----BEGIN PRIVATE KEY-----")
    swapped = "-----BEGIN PRIVATE KEY-----" + x_block + "-----BEGIN PRIVATE KEY-----" + ed_block
    path.write_text(swapped)
    loaded = Identity.load(tmp_path, "a")
    assert loaded.sign_public == original.sign_public


def test_repr_hides_secrets(tmp_path: Path) -> None:
    identity = Identity.generate("alice")
    path = identity.save(tmp_path)
    pem = path.read_text()
    secret_lines = [line for line in pem.splitlines() if line and not line.startswith(("#", "-"))]
    assert secret_lines
    for text in (repr(identity), str(identity), f"{identity}", repr([identity])):
        assert "alice" in text
        for line in secret_lines:
            assert line not in text
            assert line[:12] not in text
    # Raw private bytes do not appear either, in any common encoding.
    raw = identity._sign_key.private_bytes_raw()
    assert raw.hex()[:16] not in repr(identity)
    assert b64(raw)[:16] not in repr(identity)
    assert identity.fingerprint in repr(identity)


def test_identity_cannot_be_pickled() -> None:
    identity = Identity.generate("alice")
    with pytest.raises(TypeError, match="private keys"):
        pickle.dumps(identity)
    with pytest.raises(TypeError, match="private keys"):
        copy.deepcopy(identity)


def test_identity_rejects_wrong_key_types() -> None:
    box = X25519PrivateKey.generate()
    with pytest.raises(TypeError, match="sign_key"):
        Identity("a", box, box)  # type: ignore[arg-type]


# --- Federation file -----------------------------------------------------------------


def test_federation_round_trip(tmp_path: Path) -> None:
    members = [entry("c-lab"), entry("a-hospital", "http://127.0.0.1:8001"), entry("b")]
    path = tmp_path / "federation.toml"
    save_federation(path, members)
    loaded = load_federation(path)
    assert list(loaded) == ["c-lab", "a-hospital", "b"]  # file order, not sorted
    assert list(loaded.values()) == members
    # A dict round-trips as well, and the file is plain TOML.
    save_federation(path, loaded)
    assert load_federation(path) == loaded
    document = tomllib.loads(path.read_text())
    assert document["member"][1] == members[1].to_dict()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_empty_federation(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    save_federation(path, [])
    assert load_federation(path) == {}
    path.write_text("# nothing yet\n")
    assert load_federation(path) == {}


def test_save_federation_refuses_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two members are named 'a'"):
        save_federation(tmp_path / "f.toml", [entry("a"), entry("a")])


def test_add_member_appends_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "federation.toml"
    a, b = entry("a"), entry("b")
    add_member(path, a)
    add_member(path, b)
    assert load_federation(path) == {"a": a, "b": b}
    new_a = entry("a", "https://a2.example")
    add_member(path, new_a)
    loaded = load_federation(path)
    assert list(loaded) == ["a", "b"]
    assert loaded["a"] == new_a
    assert loaded["a"].sign_public != a.sign_public


def _member_toml(**fields: str) -> str:
    return "[[member]]\n" + "".join(f"{k} = {_toml_string(v)}\n" for k, v in fields.items())


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("[[member]\nname = ", r"not valid TOML"),
        ("[[members]]\nname = 'a'\n", r"unknown top-level key\(s\) members"),
        ("member = 3\n", r"array of tables"),
        ("member = [1, 2]\n", r"member #1: must be a \[\[member\]\] table"),
    ],
)
def test_malformed_federation_files(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(content)
    with pytest.raises(FederationFileError, match=pattern) as info:
        load_federation(path)
    assert str(path) in str(info.value)


def test_federation_errors_name_the_member(tmp_path: Path) -> None:
    good = entry("a").to_dict()
    path = tmp_path / "federation.toml"

    bad_key = {**entry("b").to_dict(), "box_key": b64(b"\x00" * 16)}
    path.write_text(_member_toml(**good) + _member_toml(**bad_key))
    with pytest.raises(FederationFileError, match=r"member #2: `box_key`") as info:
        load_federation(path)
    assert info.value.index == 2
    assert info.value.path == path
    assert isinstance(info.value, ValueError)

    missing = {k: v for k, v in entry("b").to_dict().items() if k != "url"}
    path.write_text(_member_toml(**missing) + _member_toml(**good))
    with pytest.raises(FederationFileError, match=r"member #1: missing field\(s\) url"):
        load_federation(path)

    path.write_text(_member_toml(**good) + _member_toml(**entry("a").to_dict()))
    with pytest.raises(FederationFileError, match=r"member #2: the name 'a' is already used"):
        load_federation(path)

    path.write_text(_member_toml(**good, extra="1"))
    with pytest.raises(FederationFileError, match=r"member #1: unknown field\(s\) extra"):
        load_federation(path)

    path.write_text(_member_toml(**{**good, "name": "Upper"}))
    with pytest.raises(FederationFileError, match=r"member #1: `name` must match"):
        load_federation(path)


def test_load_federation_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_federation(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "value",
    ["plain", 'quote " inside', "back\\slash", "new\nline\ttab\rcr", "\x00\x01\x1f\x7f", "ünï"],
)
def test_toml_string_escaping(value: str) -> None:
    assert tomllib.loads(f"key = {_toml_string(value)}\n") == {"key": value}
