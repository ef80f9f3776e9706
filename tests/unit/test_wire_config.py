"""Unit tests of the small building blocks: wire format, settings, tokens, audit, handles, errors.

No server, no NATS: these test pure functions and files in ``tmp_path``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import re
import stat
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fdrtd_client import wire
from fdrtd_server import errors
from fdrtd_server.audit import AuditLog, verify
from fdrtd_server.bus import new_handle, parse_handle
from fdrtd_server.config import (
    _POLICY_KEYS,
    CONFIG_FILE,
    Secret,
    Settings,
    TokenStore,
    init_home,
    load_settings,
)
from fdrtd_server.microservice import Environment
from fdrtd_server.server import environment

# -- wire: msgpack with typed arrays ---------------------------------------------

DTYPES = ["|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"]
SHAPES = [(), (0,), (0, 3), (7,), (2, 3, 4)]


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    count = int(np.prod(shape, dtype=np.int64))
    values = np.arange(count) % 7 - (3 if np.dtype(dtype).kind in "if" else 0)
    return values.astype(dtype).reshape(shape)


def _ext(parts: list[Any], code: int = wire.NDARRAY_EXT) -> bytes:
    """A hand-made message holding one array extension with these parts."""
    body = msgpack.packb(parts, use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(code, body), use_bin_type=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_array_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = _sample(dtype, shape)
    back = wire.unpackb(wire.packb({"a": array, "n": [array]}))
    assert set(back) == {"a", "n"}
    for decoded in (back["a"], back["n"][0]):
        assert isinstance(decoded, np.ndarray)
        assert decoded.dtype == np.dtype(dtype)
        assert decoded.dtype.str == dtype
        assert decoded.shape == shape
        assert np.array_equal(decoded, array)
        assert not decoded.flags.writeable


def test_non_contiguous_arrays_round_trip() -> None:
    base = np.arange(60.0).reshape(3, 4, 5)
    for array in (base[:, ::2, 1:], np.asfortranarray(base), base.T):
        back = wire.unpackb(wire.packb(array))
        assert back.shape == array.shape
        assert np.array_equal(back, array)


@pytest.mark.parametrize("dtype", [">f8", ">i4", ">u2", ">f4"])
def test_big_endian_input_comes_back_little_endian(dtype: str) -> None:
    array = np.array([[1.5, -2.0, 3.0], [0.0, 7.0, 255.0]]).astype(np.dtype(dtype))
    if np.dtype(dtype).kind == "u":
        array = np.abs(array)
    back = wire.unpackb(wire.packb(array))
    assert back.dtype.byteorder in ("<", "=")
    assert back.dtype.str == "<" + dtype[1:]
    assert np.array_equal(back, array)


def test_scalars_and_plain_data_round_trip() -> None:
    message = {
        "i": np.int64(-5),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "t": (1, 2),
        "s": "text",
        "raw": b"\x00\x01",
        "none": None,
    }
    assert wire.unpackb(wire.packb(message)) == {
        "i": -5,
        "f": 0.5,
        "b": True,
        "t": [1, 2],
        "s": "text",
        "raw": b"\x00\x01",
        "none": None,
    }


@pytest.mark.parametrize(
    "array",
    [
        np.array([1, "a"], dtype=object),
        np.array(["a", "b"]),
        np.array([1 + 2j]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
    ],
    ids=["object", "str", "complex", "datetime"],
)
def test_non_numeric_arrays_are_not_sent(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(wire.WireError, match="boolean, integer and float"):
        wire.packb({"x": array})


@pytest.mark.parametrize("dtype", ["|O", "<U3", "<c16", "|V8", "<M8[D]", "(2,)<f8"])
def test_non_numeric_dtypes_are_refused_on_decoding(dtype: str) -> None:
    with pytest.raises(wire.WireError, match="boolean, integer or float"):
        wire.unpackb(_ext([dtype, [1], b"\x00" * 16]))


def test_unknown_dtype_name_is_refused_without_echo() -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.unpackb(_ext(["secret-dtype-4711", [1], b"\x00" * 8]))
    assert "4711" not in str(refused.value)
    assert "dtype" in str(refused.value)


@pytest.mark.parametrize("length", [0, 23, 25, 48])
def test_lying_byte_length_is_refused(length: int) -> None:
    with pytest.raises(wire.WireError, match="byte length"):
        wire.unpackb(_ext(["<f8", [3], b"\x01" * length]))


@pytest.mark.parametrize(
    "parts",
    [
        ["<f8", [-1], b""],
        ["<f8", [1.5], b"\x00" * 8],
        ["<f8", "3", b"\x00" * 24],
        ["<f8", [1] * 9, b"\x00" * 8],
        [8, [1], b"\x00" * 8],
        ["<f8", [1], "not bytes"],
        ["<f8", [1]],
    ],
    ids=["negative", "float-size", "string-shape", "nine-dims", "dtype-int", "str-raw", "two"],
)
def test_malformed_array_parts_are_refused(parts: list[Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.unpackb(_ext(parts))


@pytest.mark.parametrize("shape", [[2**62, 4], [2**32, 2**32], [2**63 - 1, 2], [2**64 - 1]])
def test_huge_shapes_are_refused(shape: list[int]) -> None:
    with pytest.raises(wire.WireError):
        wire.unpackb(_ext(["|i1", shape, b""]))


@pytest.mark.parametrize("code", [0, 2, 42, 127])
def test_unknown_extension_code_is_refused(code: int) -> None:
    with pytest.raises(wire.WireError, match="unknown msgpack extension"):
        wire.unpackb(_ext(["<f8", [1], b"\x00" * 8], code=code))
    # a reserved negative code (-5, as fixext1), which ExtType cannot even build
    with pytest.raises(wire.WireError, match="unknown msgpack extension"):
        wire.unpackb(b"\x81\xa1x\xd4\xfb\x00")


def test_big_endian_wire_dtype_is_refused_or_decoded_correctly() -> None:
    # A client in another language may send big-endian bytes labelled '>f8';
    # silently reading them as little-endian would corrupt the values.
    values = np.array([1.5, -2.0, 1e10], dtype=">f8")
    try:
        back = wire.unpackb(_ext([">f8", [3], values.tobytes()]))
    except wire.WireError:
        return
    assert np.array_equal(back, values), back


def test_max_size() -> None:
    data = wire.packb({"x": np.zeros(100)})
    assert np.array_equal(wire.unpackb(data, max_size=len(data))["x"], np.zeros(100))
    with pytest.raises(wire.WireError, match=f"limit of {len(data) - 1} bytes"):
        wire.unpackb(data, max_size=len(data) - 1)


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"", b"\x81\x01\x02"])
def test_invalid_msgpack_is_refused(data: bytes) -> None:
    # 0xc1 is never used; a truncated array; nothing; a map with an int key
    with pytest.raises(wire.WireError):
        wire.unpackb(data)


def test_packb_refuses_arbitrary_objects() -> None:
    with pytest.raises(TypeError, match="Path"):
        wire.packb({"p": Path("/etc/passwd")})


# -- wire: the JSON form -----------------------------------------------------------


def test_json_form_round_trip() -> None:
    array = np.arange(24, dtype="<i4").reshape(2, 3, 4)
    message = {"a": array, "list": [np.array(2.5), {"deep": np.array([True, False])}], "k": 1}
    jsonable = wire.to_jsonable(message)
    assert jsonable["a"] == {
        "__ndarray__": {
            "dtype": "<i4",
            "shape": [2, 3, 4],
            "base64": base64.b64encode(array.tobytes()).decode("ascii"),
        }
    }
    text = json.dumps(jsonable)
    back = wire.from_jsonable(json.loads(text))
    assert np.array_equal(back["a"], array) and back["a"].dtype == array.dtype
    assert back["list"][0].shape == () and float(back["list"][0]) == 2.5
    assert back["list"][1]["deep"].tolist() == [True, False]
    assert back["k"] == 1
    again = wire.json_loads(text.encode())
    assert np.array_equal(again["a"], array)


def test_json_form_of_special_values() -> None:
    assert wire.to_jsonable({"nan": float("nan"), "b": b"\xff", "t": (1, np.int8(2))}) == {
        "nan": None,
        "b": "/w==",
        "t": [1, 2],
    }
    big = np.array([1.0, 2.0], dtype=">f8")
    spec = wire.to_jsonable(big)["__ndarray__"]
    assert spec["dtype"] == "<f8"
    assert np.array_equal(wire.from_jsonable({"__ndarray__": spec}), big)
    # a map that merely has more keys is left alone
    plain = {"__ndarray__": {"dtype": "<f8"}, "other": 1}
    assert wire.from_jsonable(plain) == plain


@pytest.mark.parametrize("text", ["not base64!", "AAA", "AA==AA=="])
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(wire.WireError, match="base64"):
        wire.from_jsonable({"__ndarray__": {"dtype": "<f8", "shape": [1], "base64": text}})


def test_json_form_checks_like_msgpack() -> None:
    good = base64.b64encode(b"\x00" * 8).decode()
    with pytest.raises(wire.WireError, match="byte length"):
        wire.from_jsonable({"__ndarray__": {"dtype": "<f8", "shape": [2], "base64": good}})
    with pytest.raises(wire.WireError, match="boolean, integer or float"):
        wire.from_jsonable({"__ndarray__": {"dtype": "|O", "shape": [1], "base64": good}})
    with pytest.raises(wire.WireError, match="not valid JSON"):
        wire.json_loads(b"{nope")


@pytest.mark.parametrize("shape", [[2**64], [2**32, 2**32], [10**30, 0]])
def test_json_huge_shapes_are_refused(shape: list[int]) -> None:
    body = json.dumps({"__ndarray__": {"dtype": "|i1", "shape": shape, "base64": ""}})
    with pytest.raises(wire.WireError):
        wire.json_loads(body.encode())
    with pytest.raises(wire.WireError):
        wire.from_jsonable(json.loads(body))


# -- config: settings ------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    init_home(path, "unit", port=1111)
    return path


def _write_config(home: Path, text: str) -> None:
    (home / CONFIG_FILE).write_text(text, "utf-8")


def test_upload_limits_settings(home: Path) -> None:
    default = load_settings(home, environ={})
    assert default.max_parse_bytes == 64 * 1024 * 1024
    assert default.max_client_bytes == 32 * 1024 * 1024 * 1024
    # the commented-out lines of a new home name both settings with their defaults
    text = (home / CONFIG_FILE).read_text("utf-8")
    assert f"# max_parse_bytes = {default.max_parse_bytes}" in text
    assert f"# max_client_bytes = {default.max_client_bytes}" in text
    environ = {"FDRTD_MAX_PARSE_BYTES": "2048", "FDRTD_MAX_CLIENT_BYTES": "10240"}
    settings = load_settings(home, environ=environ)
    assert (settings.max_parse_bytes, settings.max_client_bytes) == (2048, 10240)
    _write_config(home, '[server]\nname = "unit"\nmax_client_bytes = 4096\n')
    assert load_settings(home, environ={}).max_client_bytes == 4096
    for key in ("FDRTD_MAX_PARSE_BYTES", "FDRTD_MAX_CLIENT_BYTES"):
        with pytest.raises(ValueError, match="at least 1024"):
            load_settings(home, environ={key: "10"})
        with pytest.raises(ValueError, match="not a valid int"):
            load_settings(home, environ={key: "64MiB"})


def test_token_store_refuses_reuse_and_rotates_on_purpose(home: Path) -> None:
    store = TokenStore(home)
    first = store.add("ann")
    with pytest.raises(ValueError, match="'ann' exists"):
        store.add("ann")
    with pytest.raises(ValueError, match="'admin' exists"):
        TokenStore(home).add("admin", "admin")
    assert store.authenticate(first) == ("ann", "analyst")
    second = store.add("ann", rotate=True)
    assert store.authenticate(first) is None
    assert TokenStore(home).authenticate(second) == ("ann", "analyst")
    store.revoke("ann")
    assert store.authenticate(second) is None
    with pytest.raises(ValueError, match="was revoked"):
        store.add("ann")
    with pytest.raises(ValueError, match="no token named 'bob' to rotate"):
        store.add("bob", rotate=True)


def test_settings_precedence_file_env_overrides(home: Path) -> None:
    _write_config(
        home,
        '[server]\nname = "unit"\nport = 1111\nsession_timeout = 5\n'
        "[policy]\nmin_cohort = 4\nallow_map_reduce = true\n",
    )
    from_file = load_settings(home, environ={})
    assert (from_file.port, from_file.min_cohort, from_file.session_timeout) == (1111, 4, 5.0)
    assert from_file.allow_map_reduce is True
    assert isinstance(from_file.session_timeout, float)
    assert from_file.home == home and from_file.name == "unit"

    environ = {"FDRTD_PORT": "2222", "FDRTD_MIN_COHORT": "7", "FDRTD_ALLOW_MAP_REDUCE": "no"}
    from_env = load_settings(home, environ=environ)
    assert (from_env.port, from_env.min_cohort, from_env.allow_map_reduce) == (2222, 7, False)
    assert from_env.session_timeout == 5.0  # not overridden: still the file's

    overridden = load_settings(home, {"port": 3333, "host": None}, environ=environ)
    assert (overridden.port, overridden.min_cohort, overridden.host) == (3333, 7, "127.0.0.1")


def test_the_revealing_protocols_are_off_unless_the_policy_allows_them(home: Path) -> None:
    _write_config(home, '[server]\nname = "unit"\n')
    default = load_settings(home, environ={})
    assert (default.allow_set_union, default.allow_matrix_product) == (False, False)
    assert default.allow_vertical_regression is False
    assert default.allow_set_intersection is False
    _write_config(
        home,
        '[server]\nname = "unit"\n[policy]\nallow_matrix_product = true\nallow_set_union = true\n'
        "allow_set_intersection = true\n",
    )
    allowed = load_settings(home, environ={})
    assert (allowed.allow_set_union, allowed.allow_matrix_product) == (True, True)
    assert allowed.allow_set_intersection is True
    shut = load_settings(home, environ={"FDRTD_ALLOW_SET_INTERSECTION": "no"})
    assert shut.allow_set_intersection is False
    closed = load_settings(home, environ={"FDRTD_ALLOW_MATRIX_PRODUCT": "false"})
    assert closed.allow_matrix_product is False
    opened = load_settings(home, environ={"FDRTD_ALLOW_VERTICAL_REGRESSION": "1"})
    assert opened.allow_vertical_regression is True


def test_settings_read_the_process_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FDRTD_SESSION_TIMEOUT", "12.5")
    monkeypatch.setenv("FDRTD_MAX_BODY_BYTES", "4096")
    settings = load_settings(home)
    assert (settings.session_timeout, settings.max_body_bytes) == (12.5, 4096)


def test_init_home_writes_loadable_settings(home: Path) -> None:
    settings = load_settings(home, environ={})
    assert settings == Settings(home=home, name="unit", port=1111)
    assert settings.url == "http://127.0.0.1:1111"
    assert (home / "identity").is_dir()
    assert (home / "jetstream").is_dir()
    # every input-revealing switch is written, and off
    text = (home / CONFIG_FILE).read_text("utf-8")
    for switch in ("set_union", "set_intersection", "matrix_product", "vertical_regression"):
        assert f"allow_{switch} = false\n" in text


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"FDRTD_PORT": "eighty"}, "port"),
        ({"FDRTD_PORT": "70000"}, "port"),
        ({"FDRTD_MIN_COHORT": "0"}, "min_cohort"),
        ({"FDRTD_MIN_COHORT": "2.5"}, "min_cohort"),
        ({"FDRTD_ALLOW_MAP_REDUCE": "maybe"}, "allow_map_reduce"),
        ({"FDRTD_ALLOW_SET_INTERSECTION": "sometimes"}, "allow_set_intersection"),
        ({"FDRTD_SESSION_TIMEOUT": "-5"}, "session_timeout"),
        ({"FDRTD_SESSION_TIMEOUT": "soon"}, "session_timeout"),
        ({"FDRTD_MAX_BODY_BYTES": "17"}, "max_body_bytes"),
        ({"FDRTD_MAX_UPLOAD_BYTES": "-1"}, "max_upload_bytes"),
        ({"FDRTD_NAME": "Not A Name"}, "name"),
    ],
)
def test_bad_environment_values_name_the_key(home: Path, environ: dict[str, str], key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'") as refused:
        load_settings(home, environ=environ)
    (value,) = environ.values()
    assert value not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nname = "unit"\nport = "x"\n', "port"),
        ('[server]\nname = "unit"\nport = 1.5\n', "port"),
        ('[server]\nname = "unit"\nport = true\n', "port"),
        ('[server]\nname = "unit"\nport = 99999\n', "port"),
        ("[server]\nname = 5\n", "name"),
        ('[server]\nname = "unit"\n[policy]\nmin_cohort = "many"\n', "min_cohort"),
        ('[server]\nname = "unit"\n[policy]\nallow_map_reduce = 2\n', "allow_map_reduce"),
        (
            '[server]\nname = "unit"\n[policy]\nallow_set_intersection = "on"\n',
            "allow_set_intersection",
        ),
    ],
)
def test_bad_file_values_name_the_key(home: Path, text: str, key: str) -> None:
    _write_config(home, text)
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_settings(home, environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nname = "unit"\ncolour = "red"\n', "colour"),
        ('[server]\nname = "unit"\nmicroservices = ["map"]\n', "microservices"),
        ('[server]\nname = "unit"\n[policy]\nmin_cohorts = 5\n', "min_cohorts"),
    ],
)
def test_unknown_settings_are_refused(home: Path, text: str, key: str) -> None:
    _write_config(home, text)
    with pytest.raises(ValueError, match=f"unknown setting '{key}'"):
        load_settings(home, environ={})


def test_policy_microservices(home: Path) -> None:
    _write_config(home, '[server]\nname = "unit"\n[policy]\nmicroservices = ["data", "map"]\n')
    assert load_settings(home, environ={}).microservices == ("data", "map")
    _write_config(home, '[server]\nname = "unit"\n[policy]\nmicroservices = "map"\n')
    with pytest.raises(ValueError, match="microservices"):
        load_settings(home, environ={})


def test_broken_toml_and_missing_home(home: Path, tmp_path: Path) -> None:
    _write_config(home, "[server\nname=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_settings(home, environ={})
    with pytest.raises(FileNotFoundError, match="not a server home"):
        load_settings(tmp_path / "nowhere", environ={})


def test_init_home_refuses_an_existing_home(home: Path) -> None:
    before = (home / CONFIG_FILE).read_text("utf-8")
    tokens_before = (home / "tokens.json").read_text("utf-8")
    with pytest.raises(FileExistsError, match="already holds a server"):
        init_home(home, "other", port=2222)
    assert (home / CONFIG_FILE).read_text("utf-8") == before
    assert (home / "tokens.json").read_text("utf-8") == tokens_before


def test_init_home_validates_the_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'name'"):
        init_home(tmp_path / "x", "Bad Name")
    assert not (tmp_path / "x" / CONFIG_FILE).exists()


def test_secret_repr_hides_the_value() -> None:
    secret = Secret("hunter2-token")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in repr([secret])
    assert "hunter2" not in f"{secret!r}"
    assert str(secret) == "hunter2-token"


# -- config: tokens -----------------------------------------------------------------


def test_token_store_add_and_authenticate(home: Path) -> None:
    store = TokenStore(home)
    analyst = store.add("ann")
    admin = store.add("root", "admin")
    assert len(analyst) >= 43 and analyst != admin
    assert store.authenticate(analyst) == ("ann", "analyst")
    assert store.authenticate(admin) == ("root", "admin")
    assert store.authenticate(analyst + "x") is None
    assert store.authenticate("") is None
    assert store.authenticate(analyst[:-1]) is None
    # another store (another process) sees the same tokens
    assert TokenStore(home).authenticate(analyst) == ("ann", "analyst")


def test_init_home_admin_token(tmp_path: Path) -> None:
    token = init_home(tmp_path / "h2", "second")
    assert TokenStore(tmp_path / "h2").authenticate(token) == ("admin", "admin")


def test_token_store_picks_up_tokens_added_elsewhere(home: Path) -> None:
    running = TokenStore(home)
    assert running.authenticate("nothing-yet") is None
    token = TokenStore(home).add("late")
    assert running.authenticate(token) == ("late", "analyst")


@pytest.mark.parametrize(("name", "role"), [("Bad Name", "analyst"), ("ok", "root"), ("", "admin")])
def test_token_store_refuses_bad_names_and_roles(home: Path, name: str, role: str) -> None:
    with pytest.raises(ValueError, match="token"):
        TokenStore(home).add(name, role)


def test_tokens_file_is_private_and_holds_no_plaintext(home: Path) -> None:
    tokens = [TokenStore(home).add(f"user{i}") for i in range(3)]
    path = home / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text("utf-8")
    for token in tokens:
        assert token not in text
        assert token[:16] not in text
    entries = json.loads(text)
    assert set(entries) == {"admin", "user0", "user1", "user2"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", entry["hash"]) for entry in entries.values())
    assert not list(home.glob("*.tmp"))


# -- audit log --------------------------------------------------------------------------


def _write_records(path: Path, count: int = 4) -> None:
    log = AuditLog(path)
    for i in range(count):
        log.write(f"user{i}", "compute", f"r-{i:040x}", outcome="ok", function="aggregate")


def test_audit_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_records(path)
    assert verify(path) == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    assert [r["principal"] for r in records] == ["user0", "user1", "user2", "user3"]
    assert records[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert records[2]["function"] == "aggregate" and records[2]["action"] == "compute"
    # a new AuditLog on the same file continues the chain
    AuditLog(path).write("late", "release", "d-" + "0" * 40)
    assert verify(path) == 5
    AuditLog(None).write("nobody", "noop")  # no file: nothing happens
    assert verify(path) == 5


def _lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines(keepends=True)


def test_audit_verify_detects_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_records(path)
    lines = _lines(path)
    lines[1] = lines[1].replace('"user1"', '"mallory"')
    path.write_text("".join(lines), "utf-8")
    with pytest.raises(ValueError, match="line 2"):
        verify(path)


def test_audit_verify_detects_an_edit_with_a_recomputed_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_records(path)
    lines = _lines(path)
    record = json.loads(lines[1])
    del record["hash"]
    record["outcome"] = "refused"
    body = json.dumps(record, sort_keys=True, separators=(",", ":"))
    # in the writer's exact form ("hash" last), so that only the chain can tell
    lines[1] = f'{body[:-1]},"hash":"{hashlib.sha256(body.encode()).hexdigest()}"}}\n'
    path.write_text("".join(lines), "utf-8")
    with pytest.raises(ValueError, match="line 3"):
        verify(path)


def test_audit_verify_detects_a_removal(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_records(path)
    lines = _lines(path)
    path.write_text("".join(lines[:1] + lines[2:]), "utf-8")
    with pytest.raises(ValueError, match="line 2"):
        verify(path)
    path.write_text("".join(lines[1:]), "utf-8")
    with pytest.raises(ValueError, match="line 1"):
        verify(path)


def test_audit_verify_detects_reordering(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_records(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines), "utf-8")
    with pytest.raises(ValueError, match="line 2"):
        verify(path)


# -- handles ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "prefix"), [("data", "d-"), ("result", "r-")])
def test_new_handle_kinds_and_bits(kind: str, prefix: str) -> None:
    handles = [new_handle(kind) for _ in range(500)]
    assert all(re.fullmatch(prefix + "[0-9a-f]{40}", h) for h in handles)
    assert len(set(handles)) == 500
    # 40 hex digits = 160 bits, and every digit position varies
    assert len(handles[0]) - len(prefix) == 40
    for position in range(2, 42):
        assert len({h[position] for h in handles}) > 8
    assert parse_handle(handles[0], kind) == handles[0]


def test_parse_handle_refuses_the_other_kind() -> None:
    with pytest.raises(errors.BadRequest, match="'data' must be a data handle, not another"):
        parse_handle(new_handle("result"), "data", "data")
    with pytest.raises(errors.BadRequest, match="'result' must be a result handle"):
        parse_handle(new_handle("data"), "result", "result")


GARBAGE = [
    None,
    42,
    b"d-" + b"a" * 40,
    ["d-" + "a" * 40],
    "",
    "d-",
    "d-" + "a" * 39,
    "d-" + "a" * 41,
    "d-" + "A" * 40,
    "D-" + "a" * 40,
    "x-" + "a" * 40,
    "d_" + "a" * 40,
    " d-" + "a" * 40,
    "d-" + "a" * 40 + " ",
    "d-" + "a" * 40 + "\n",
    "d-" + "g" * 40,
    "d-../../etc/passwd-secretvalue",
    "<script>alert('secretvalue')</script>",
]
GARBAGE_IDS = [
    "none",
    "int",
    "bytes",
    "list",
    "empty",
    "prefix-only",
    "39-hex",
    "41-hex",
    "upper-hex",
    "upper-kind",
    "unknown-kind",
    "underscore",
    "leading-space",
    "trailing-space",
    "trailing-newline",
    "non-hex",
    "path",
    "script",
]


@pytest.mark.parametrize("text", GARBAGE, ids=GARBAGE_IDS)
def test_parse_handle_rejects_garbage_without_echoing_it(text: Any) -> None:
    with pytest.raises(errors.BadRequest) as refused:
        parse_handle(text, "data", "dataset")
    message = str(refused.value)
    assert message == "'dataset' must be a data handle as returned by the server"
    assert refused.value.status == 400


# -- errors --------------------------------------------------------------------------------

STATUS_CLASSES = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
    422: errors.ComputationFailed,
    503: errors.ServiceUnavailable,
    504: errors.PartyTimeout,
}


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES.items())
def test_error_for_status_maps_each_status(status: int, cls: type[errors.FdrtdError]) -> None:
    error = errors.error_for_status(status, "the message")
    assert type(error) is cls
    assert error.status == status
    assert error.message == "the message" and str(error) == "the message"


@pytest.mark.parametrize("status", [418, 500, 0, 302])
def test_error_for_unknown_status_is_the_base_error(status: int) -> None:
    error = errors.error_for_status(status, "odd")
    assert type(error) is errors.FdrtdError
    assert error.status == 500 and error.message == "odd"


def test_error_tree() -> None:
    assert isinstance(errors.error_for_status(504, "late"), TimeoutError)
    cohort = errors.CohortTooSmall(5)
    assert isinstance(cohort, errors.Forbidden) and cohort.status == 403
    assert cohort.minimum == 5 and "minimum cohort of 5" in cohort.message
    assert issubclass(errors.InsufficientData, errors.BadRequest)
    assert errors.PeerRejected.status == 403
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.FdrtdError)
    }
    assert set(errors.__all__) == classes | {"error_for_status"}


def test_microservices_see_every_policy_setting(tmp_path: Path) -> None:
    # Environment is built from the settings of the same names: a new policy
    # switch must be a field of both, and reaches the microservices as set
    settings = Settings(
        home=tmp_path, name="s", min_cohort=7, allow_set_intersection=True, session_timeout=9.0
    )
    env = environment(settings)
    assert env.server == "s" and env.min_cohort == 7 and env.session_timeout == 9.0
    assert env.allow_set_intersection and not env.allow_set_union
    fields = {f.name for f in dataclasses.fields(Environment)} - {"server"}
    policy = {key for key in _POLICY_KEYS if key != "microservices"}
    assert policy <= fields
