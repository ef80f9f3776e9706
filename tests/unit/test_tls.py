"""TLS settings, contexts and the gateway's TLS client, against a private CA made here.

The settings are checked when they are loaded: every wrong file or missing
companion setting stops the start with the setting's name. The contexts
speak TLS 1.2 at least and the gateway's checks the peer's chain against the
federation's CA alone and its name. A tiny TLS server on 127.0.0.1 (asyncio)
shows the gateway's client accepting a peer of the CA, refusing one of
another CA or of another name, and presenting its certificate when the peer
requires one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from certificates import Authority, Issued, make_ca
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fdrtd_client import Client, Federation
from fdrtd_server import cli, tls
from fdrtd_server._http import HttpError, PeerHttpClient, TlsRefused
from fdrtd_server.config import Settings, init_home, load_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The federation's CA and a server certificate; another CA and one of its certificates."""
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca")
    other = make_ca(root / "other", "someone else's CA")
    yield {
        "root": root,
        "ca": ca,
        "server": ca.issue(root / "ca", "server"),
        "client": ca.issue(root / "ca", "analyst", server=False, dns=(), ips=()),
        "other": other,
        "stranger": other.issue(root / "other", "stranger"),
    }


def settings(home: Path, **tls_settings: Any) -> Settings:
    return Settings(home=home, name="alpha", **tls_settings)


# -- settings ------------------------------------------------------------------------------


def test_tls_settings_serve_https(tmp_path: Path, pki: dict[str, Any]) -> None:
    server: Issued = pki["server"]
    checked = settings(tmp_path, tls_cert=str(server.cert), tls_key=str(server.key))
    assert checked.url.startswith("https://")
    assert settings(tmp_path).url.startswith("http://")


def test_a_key_without_a_certificate_is_refused_naming_the_setting(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="'tls_key' is set but 'tls_cert' is not"):
        settings(tmp_path, tls_key=str(pki["server"].key))
    with pytest.raises(ValueError, match="'tls_client_key' is set but 'tls_client_cert' is not"):
        settings(tmp_path, tls_client_key=str(pki["client"].key))


def test_mutual_tls_needs_a_certificate_and_a_ca(tmp_path: Path, pki: dict[str, Any]) -> None:
    server: Issued = pki["server"]
    with pytest.raises(ValueError, match="'tls_require_client_cert' needs tls_cert and tls_ca"):
        settings(tmp_path, tls_require_client_cert=True)
    with pytest.raises(ValueError, match="'tls_require_client_cert' needs tls_ca"):
        settings(
            tmp_path,
            tls_cert=str(server.cert),
            tls_key=str(server.key),
            tls_require_client_cert=True,
        )


@pytest.mark.parametrize("setting", ["tls_cert", "tls_ca", "tls_client_cert"])
def test_a_missing_file_is_refused_naming_the_setting(
    tmp_path: Path, pki: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ValueError, match=rf"setting '{setting}': .*missing.pem does not exist"):
        settings(tmp_path, **{setting: str(tmp_path / "missing.pem")})


@pytest.mark.parametrize(
    ("setting", "content", "says"),
    [
        ("tls_cert", b"not a certificate", "holds no PEM certificate"),
        ("tls_ca", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "holds no"),
        ("tls_key", b"garbage", "holds no PEM private key"),
    ],
)
def test_a_file_that_does_not_parse_is_refused_naming_the_setting(
    tmp_path: Path, pki: dict[str, Any], setting: str, content: bytes, says: str
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    files = {"tls_cert": str(pki["server"].cert), "tls_key": str(pki["server"].key)}
    files[setting] = str(bad)
    with pytest.raises(ValueError, match=rf"setting '{setting}': .*{says}"):
        settings(tmp_path, **files)


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"setting 'tls_key': the key in .* is not the key of"):
        settings(tmp_path, tls_cert=str(pki["server"].cert), tls_key=str(pki["client"].key))


def test_an_encrypted_key_is_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match=r"setting 'tls_key': the private key .* is encrypted"):
        settings(tmp_path, tls_cert=str(pki["server"].cert), tls_key=str(locked))


def test_an_expired_certificate_is_refused(tmp_path: Path, pki: dict[str, Any]) -> None:
    ca: Authority = pki["ca"]
    past = datetime.now(UTC) - timedelta(days=3)
    old = ca.issue(tmp_path, "old", not_before=past, not_after=past + timedelta(days=1))
    with pytest.raises(ValueError, match=r"setting 'tls_cert': the certificate in .* expired on"):
        settings(tmp_path, tls_cert=str(old.cert), tls_key=str(old.key))


def test_a_directory_is_not_a_pem_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"setting 'tls_ca': .* is a directory"):
        settings(tmp_path, tls_ca=str(tmp_path))


def test_fdrtd_toml_names_the_files_relative_to_the_home(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    home = tmp_path / "home"
    init_home(home, "alpha")
    server: Issued = pki["server"]
    (home / "tls").mkdir()
    for source in (server.cert, server.key, pki["ca"].cert):
        (home / "tls" / source.name).write_bytes(source.read_bytes())
    config = home / "fdrtd.toml"
    config.write_text(
        config.read_text().replace(
            "[server]\n",
            '[server]\ntls_cert = "tls/server.pem"\ntls_key = "tls/server.key"\n'
            'tls_ca = "tls/ca.pem"\ntls_require_client_cert = true\n',
        )
    )
    loaded = load_settings(home, environ={})
    assert loaded.url.startswith("https://")
    files = tls.files_of(loaded)
    assert files.cert == home / "tls" / "server.pem"
    context = files.server_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED


def test_environment_variables_set_tls_too(tmp_path: Path, pki: dict[str, Any]) -> None:
    home = tmp_path / "home"
    init_home(home, "alpha")
    with pytest.raises(ValueError, match="'tls_key' is set but 'tls_cert' is not"):
        load_settings(home, environ={"FDRTD_TLS_KEY": str(pki["server"].key)})


def test_serve_with_a_key_alone_exits_naming_the_setting(
    tmp_path: Path, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    init_home(home, "alpha")
    assert cli.main(["serve", str(home), "--tls-key", str(pki["server"].key)]) == 2
    assert "'tls_key' is set but 'tls_cert' is not" in capsys.readouterr().err


# -- contexts ------------------------------------------------------------------------------


def test_contexts_speak_tls_1_2_at_least_and_check_names(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    server: Issued = pki["server"]
    files = tls.files_of(
        settings(
            tmp_path, tls_cert=str(server.cert), tls_key=str(server.key), tls_ca=str(pki["ca"].cert)
        )
    )
    served = files.server_context()
    assert served is not None
    assert served.minimum_version == ssl.TLSVersion.TLSv1_2
    assert served.verify_mode == ssl.CERT_NONE  # no client certificates unless required
    peer = files.peer_context()
    assert peer.minimum_version == ssl.TLSVersion.TLSv1_2
    assert peer.check_hostname and peer.verify_mode == ssl.CERT_REQUIRED
    # only the federation's CA: not the system's store
    assert [c["subject"] for c in peer.get_ca_certs()] == [
        ((("commonName", "fdrtd test federation CA"),),)
    ]


def test_without_a_ca_peers_are_checked_against_the_system_store(tmp_path: Path) -> None:
    peer = tls.files_of(settings(tmp_path)).peer_context()
    assert peer.check_hostname and peer.verify_mode == ssl.CERT_REQUIRED
    assert peer.minimum_version == ssl.TLSVersion.TLSv1_2


# -- the gateway's client against a TLS server ---------------------------------------------


def _server_context(issued: Issued, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _post_over_tls(
    server_context: ssl.SSLContext, client: PeerHttpClient, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """POST once to a TLS server on 127.0.0.1 that answers 202; the client's outcome."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        status, body, _ = await client.post(f"https://{host}:{port}", "/v1/peer", b"x", "a/b")
        return status, body
    finally:
        await client.close()
        server.close()


def _client(tmp_path: Path, **tls_settings: Any) -> PeerHttpClient:
    context = tls.files_of(settings(tmp_path, **tls_settings)).peer_context()
    return PeerHttpClient(timeout=30, ssl_context=context)


def test_gateway_client_accepts_a_peer_of_the_federation_ca(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    client = _client(tmp_path, tls_ca=str(pki["ca"].cert))
    assert asyncio.run(_post_over_tls(_server_context(pki["server"]), client)) == (202, b"ok")


def test_gateway_client_refuses_a_peer_of_another_ca(tmp_path: Path, pki: dict[str, Any]) -> None:
    client = _client(tmp_path, tls_ca=str(pki["ca"].cert))
    with pytest.raises(TlsRefused, match=r"its TLS certificate was not accepted .* 'tls_ca'"):
        asyncio.run(_post_over_tls(_server_context(pki["stranger"]), client))


def test_gateway_client_refuses_a_certificate_for_another_name(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    ca: Authority = pki["ca"]
    elsewhere = ca.issue(tmp_path, "elsewhere", ips=("192.0.2.7",), dns=("peer.example",))
    client = _client(tmp_path, tls_ca=str(ca.cert))
    with pytest.raises(TlsRefused, match=r"not accepted .*(mismatch|match)"):
        asyncio.run(_post_over_tls(_server_context(elsewhere), client))


def test_gateway_client_without_a_ca_refuses_a_private_ca(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    client = PeerHttpClient(timeout=30)
    with pytest.raises(TlsRefused, match="not accepted"):
        asyncio.run(_post_over_tls(_server_context(pki["server"]), client))


def test_gateway_client_presents_its_certificate_to_a_peer_that_requires_one(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    ca: Authority = pki["ca"]
    requiring = _server_context(pki["server"], client_ca=ca.cert)
    server: Issued = pki["server"]
    # by default the gateway presents the server's own certificate
    presenting = _client(
        tmp_path, tls_ca=str(ca.cert), tls_cert=str(server.cert), tls_key=str(server.key)
    )
    assert asyncio.run(_post_over_tls(requiring, presenting)) == (202, b"ok")
    client: Issued = pki["client"]
    explicit = _client(
        tmp_path,
        tls_ca=str(ca.cert),
        tls_client_cert=str(client.cert),
        tls_client_key=str(client.key),
    )
    assert asyncio.run(_post_over_tls(requiring, explicit)) == (202, b"ok")


@pytest.mark.parametrize("presents", ["nothing", "stranger"])
def test_a_peer_requiring_a_client_certificate_refuses_the_gateway_without_one(
    tmp_path: Path, pki: dict[str, Any], presents: str
) -> None:
    ca: Authority = pki["ca"]
    requiring = _server_context(pki["server"], client_ca=ca.cert)
    options: dict[str, str] = {"tls_ca": str(ca.cert)}
    if presents == "stranger":
        options |= {"tls_client_cert": str(pki["stranger"].cert)}
        options |= {"tls_client_key": str(pki["stranger"].key)}
    with pytest.raises(HttpError) as refused:
        asyncio.run(_post_over_tls(requiring, _client(tmp_path, **options)))
    # the refusal is told as a TLS one (TLS 1.3 tells it after the handshake, on the read)
    assert isinstance(refused.value, TlsRefused), refused.value


# -- the thin client -----------------------------------------------------------------------


def test_client_passes_verify_and_cert_on(pki: dict[str, Any]) -> None:
    client: Issued = pki["client"]
    pair = (str(client.cert), str(client.key))
    made = Client("https://127.0.0.1:1", "t", verify=str(pki["ca"].cert), cert=pair)
    assert made._session.verify == str(pki["ca"].cert)
    assert made._session.cert == pair
    fed = Federation.connect(
        {"alpha": ("https://127.0.0.1:1", "a"), "beta": ("https://127.0.0.1:2", "b")},
        verify=str(pki["ca"].cert),
        cert=pair,
    )
    for one in fed.clients.values():
        assert one._session.verify == str(pki["ca"].cert)
        assert one._session.cert == pair
    fed.close()


# -- plain http:// members under TLS --------------------------------------------------------


def test_with_tls_settings_the_gateway_client_never_sends_plain_http(tmp_path: Path) -> None:
    """A member whose URL says http:// gets nothing, not even a connection attempt."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = PeerHttpClient(timeout=30, https_only=True)
        try:
            with pytest.raises(TlsRefused) as refused:
                await client.post(url, "/v1/peer", b"sealed", "a/b")
            assert url in str(refused.value) and "'tls_ca'" in str(refused.value)
        finally:
            await client.close()
            server.close()

    asyncio.run(scenario())
    assert connections[0] == 0


def test_plain_members_are_named_only_when_tls_is_set(tmp_path: Path, pki: dict[str, Any]) -> None:
    urls = {"beta": "http://10.0.0.2:8000", "gamma": "https://10.0.0.3:8000"}
    assert (
        not tls.wants_https(settings(tmp_path))
        and tls.plain_members(settings(tmp_path), urls) == []
    )
    server: Issued = pki["server"]
    choices = [
        {"tls_ca": str(pki["ca"].cert)},
        {"tls_cert": str(server.cert), "tls_key": str(server.key)},
    ]
    for tls_settings in choices:
        with_tls = settings(tmp_path, **tls_settings)
        assert tls.wants_https(with_tls)
        (warning,) = tls.plain_members(with_tls, urls)
        assert "'beta'" in warning and "http://10.0.0.2:8000" in warning


def test_federation_add_warns_of_an_http_member_under_tls(
    tmp_path: Path, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from fdrtd_server.identity import Identity

    home, peer = tmp_path / "home", tmp_path / "peer"
    init_home(home, "alpha")
    init_home(peer, "beta")
    entry = Identity.load(peer / "identity", "beta").public_entry("http://10.0.0.2:8000")
    member = tmp_path / "beta.toml"
    member.write_text(cli._entry_toml(entry), "utf-8")
    assert cli.main(["federation", "add", str(home), str(member)]) == 0
    assert "warning" not in capsys.readouterr().err  # no TLS settings: nothing to say
    config = home / "fdrtd.toml"
    config.write_text(
        config.read_text().replace("[server]\n", f'[server]\ntls_ca = "{pki["ca"].cert}"\n')
    )
    assert cli.main(["federation", "add", str(home), str(member)]) == 0
    told = capsys.readouterr()
    assert "added 'beta'" in told.out
    assert "warning: federation member 'beta' has the plain http:// URL" in told.err
